"""Every word the rating app shows, in Chinese and English, and the 1–5 anchors of each dimension.

Anchors follow HEIM's human-evaluation questions: each scale point names what the rater should see,
from the worst case (1) to the best (5), so that two raters mean the same thing by a "4".
"""

from __future__ import annotations

from fangzhi.dimensions import DIMENSIONS

LANGUAGES: tuple[str, ...] = ("zh", "en")
LANGUAGE_NAMES = {"zh": "中文", "en": "English"}
# The page's language as HTML names it: it picks the glyphs (Simplified Chinese, not Japanese) and a screen reader's voice.
HTML_LANG = {"zh": "zh-CN", "en": "en"}

ANCHORS: dict[str, dict[str, tuple[str, str, str, str, str]]] = {
    "style": {
        "en": (
            "Not the target style at all",
            "Slight traces of the target style",
            "Partly in the style, mixed with other styles",
            "Clearly in the style, with minor deviations",
            "Indistinguishable from the reference paintings' style",
        ),
        "zh": (
            "完全不是目标风格",
            "略有目标风格的痕迹",
            "部分符合，夹杂其他风格",
            "明显符合，仅有细微偏差",
            "与参考作品的风格毫无二致",
        ),
    },
    "match": {
        "en": (
            "Does not match the text at all",
            "Matches only a few elements of the text",
            "Matches the main subject but misses important details",
            "Matches most of the text",
            "Matches the text exactly",
        ),
        "zh": (
            "与文字完全不符",
            "仅有少数元素与文字相符",
            "主体相符，但遗漏重要内容",
            "大部分内容与文字相符",
            "与文字完全吻合",
        ),
    },
    "detail": {
        "en": (
            "Almost no detail: blurry or empty",
            "Sparse detail",
            "A moderate amount of detail",
            "Rich detail",
            "Extremely rich, fine detail throughout",
        ),
        "zh": (
            "几乎没有细节：模糊或空洞",
            "细节稀少",
            "细节一般",
            "细节丰富",
            "细节极其丰富，处处精致",
        ),
    },
    "beauty": {
        "en": (
            "Not aesthetically pleasing at all",
            "Somewhat unpleasing",
            "Neither pleasing nor unpleasing",
            "Beautiful",
            "Exceptionally beautiful, worthy of exhibition",
        ),
        "zh": (
            "毫无美感",
            "美感较弱",
            "美感一般",
            "富有美感",
            "极具美感，堪称佳作",
        ),
    },
}

_TEXT: dict[str, dict[str, str]] = {
    "title": {"zh": "绘画风格图像评分", "en": "Painting-style image rating"},
    "language": {"zh": "语言 / Language", "en": "Language / 语言"},
    "login_intro": {
        "zh": "请打开邀请链接，或在下方输入您的评分码。",
        "en": "Open your invitation link, or type your rating code below.",
    },
    "code": {"zh": "评分码", "en": "Rating code"},
    "sign_in": {"zh": "进入", "en": "Sign in"},
    "bad_token": {
        "zh": "评分码无效或已被停用。请核对链接，或联系研究负责人。",
        "en": "This code is unknown or has been revoked. Check your link or contact the study organiser.",
    },
    "signed_in_as": {"zh": "评分人：{name}", "en": "Rater: {name}"},
    "instructions_title": {"zh": "评分说明", "en": "Instructions"},
    "instructions": {
        "zh": (
            "您将逐张看到由计算机生成的图像。每张图像旁边附有它所依据的文字描述，以及几幅目标风格的参考作品。\n\n"
            "请从以下四个方面为每张图像打 1–5 分（1 最差，5 最好），每个分数都附有说明：\n\n"
            "{dimensions}\n\n"
            "请依据您的专业判断独立评分，不必猜测图像的来源。可随时点击“上一张”修改已评分数；"
            "中途离开后再次打开链接，会从第一张未评的图像继续。少数图像会重复出现，"
            "也有个别页面会请您选择指定的分数，请照常认真作答。"
        ),
        "en": (
            "You will see computer-generated images one at a time, each beside the text it was made from "
            "and a few reference paintings of the target style.\n\n"
            "Score every image from 1 (worst) to 5 (best) on four questions; each score has a description:\n\n"
            "{dimensions}\n\n"
            "Please judge independently, from your own expertise; there is no need to guess where an image "
            "came from. Use Back or All images at any time to revise a score; if you leave and open your link again you "
            "continue at the first image you have not rated. A few images appear twice, and a few pages ask "
            "you to choose a given score: please answer them as carefully as the rest."
        ),
    },
    "start": {"zh": "开始评分", "en": "Start rating"},
    "progress": {"zh": "已完成 {done} / {total}", "en": "{done} of {total} rated"},
    "item_counter": {"zh": "第 {k} 张，共 {n} 张", "en": "Image {k} of {n}"},
    "reference": {
        "zh": "目标风格参考作品：点击一幅即可与待评图像并排放大对比。",
        "en": "Reference paintings (target style): click one to see it large beside the rated image.",
    },
    "reference_keys": {"zh": "键盘：按 Z 打开，← → 切换，Esc 返回。", "en": "Keyboard: Z opens them, ← → switch, Esc returns."},
    "zoom_rated": {"zh": "待评图像", "en": "Image being rated"},
    "zoom_reference": {"zh": "参考作品 {k} / {n}", "en": "Reference painting {k} of {n}"},
    "zoom_close": {"zh": "关闭（Esc）", "en": "Close (Esc)"},
    "text_zh": {"zh": "文字描述", "en": "Text (Chinese)"},
    "prompt_en": {"zh": "英文提示词", "en": "English prompt"},
    "attention": {
        "zh": "注意力检查：本页请在每个问题上都选择 {score} 分。",
        "en": "Attention check: on this page, please choose {score} for every question.",
    },
    "comment": {"zh": "备注（可选）", "en": "Comment (optional)"},
    "back": {"zh": "上一张", "en": "Back"},
    "save_next": {"zh": "保存并继续", "en": "Save & next"},
    "keyboard_hint": {
        "zh": "键盘：按 1–5 为高亮的问题打分并跳到下一题，↑↓ 换题，Enter 保存并继续。",
        "en": "Keyboard: 1–5 scores the highlighted question and moves on, ↑↓ change question, Enter saves and goes on.",
    },
    "overview": {"zh": "全部图像", "en": "All images"},
    "conflict": {
        "zh": "这张图像在您打开本页之后，已在另一个标签页或窗口中修改并保存（约 {minutes} 分钟前；保存的分数：{scores}）。"
        "下方保留了本页的选择；再次点击“保存并继续”将用它们覆盖。",
        "en": "This image was changed and saved in another tab or window after you opened this page (about {minutes} min ago; "
        "saved scores: {scores}). Your choices on this page are kept below; press Save & next again to overwrite with them.",
    },
    "draft_restored": {
        "zh": "已恢复您在本页尚未保存的选择，请检查后保存。",
        "en": "Your unsaved choices on this image were restored; check them and save.",
    },
    "skip_to_content": {"zh": "跳到主要内容", "en": "Skip to main content"},
    "connection_lost": {
        "zh": "与服务器的连接已断开，正在重新连接……本页的选择会保留，连接恢复后请点击“保存并继续”。",
        "en": "The connection to the server was lost; reconnecting… Your choices on this page are kept: press Save & next once it is back.",
    },
    "error": {
        "zh": "出错了。到上一次“保存并继续”为止的分数都已保存。请刷新页面；若仍有问题，请联系研究负责人。",
        "en": "Something went wrong. Every score up to your last Save & next is saved. Reload the page; "
        "if the problem persists, contact the study organiser.",
    },
    "review_title": {"zh": "我的评分", "en": "My scores"},
    "status_done": {"zh": "已评", "en": "rated"},
    "status_open": {"zh": "未评", "en": "not rated"},
    "column_image": {"zh": "图像", "en": "Image"},
    "column_status": {"zh": "状态", "en": "Status"},
    "open_item": {"zh": "打开第几张（也可点选表格中的一行）", "en": "Open image number (or pick a row in the table)"},
    "open": {"zh": "打开", "en": "Open"},
    "continue": {"zh": "继续评分", "en": "Continue rating"},
    "answer_all": {"zh": "请回答全部四个问题后再保存。", "en": "Please answer all four questions before saving."},
    "thanks_title": {"zh": "感谢您的参与！", "en": "Thank you!"},
    "thanks": {
        "zh": "您已完成全部评分，分数均已保存。您可以关闭此页面。",
        "en": "You have rated every image and all your scores are saved. You may close this page.",
    },
    "review": {"zh": "返回检查我的评分", "en": "Review my scores"},
    # ---- side-by-side (pairwise) studies ----
    "pair_instructions": {
        "zh": (
            "您将逐次看到两幅并排的计算机生成图像，它们依据同一段文字生成；下方附有几幅目标风格的参考作品。\n\n"
            "请就以下四个方面分别判断哪一幅更好：左图、右图，或两者一样：\n\n{dimensions}\n\n"
            "请依据您的专业判断独立作答，不必猜测图像的来源。可随时点击“上一张”修改已保存的选择；"
            "中途离开后再次打开链接，会从第一组未作答的图像继续。少数组合会再次出现（左右可能互换），"
            "也有个别组合中一幅是空白图，请照常认真作答。"
        ),
        "en": (
            "You will see two computer-generated images side by side, made from the same text, with a few reference "
            "paintings of the target style below them.\n\n"
            "For each of four questions, choose which image is better: left, right, or equal:\n\n{dimensions}\n\n"
            "Please judge independently, from your own expertise; there is no need to guess where an image came from. "
            "Use Back at any time to revise a saved choice; if you leave and open your link again you continue at the first "
            "comparison you have not answered. A few comparisons come again (perhaps with the sides swapped), and in a few "
            "one image is blank: please answer them as carefully as the rest."
        ),
    },
    "pair_progress": {"zh": "已完成 {done} / {total} 组", "en": "{done} of {total} comparisons done"},
    "pair_counter": {"zh": "第 {k} 组，共 {n} 组", "en": "Comparison {k} of {n}"},
    "pair_reference": {"zh": "目标风格参考作品", "en": "Reference paintings (target style)"},
    "pair_left": {"zh": "左图", "en": "Left"},
    "pair_right": {"zh": "右图", "en": "Right"},
    "pair_choice_left": {"zh": "左图更好", "en": "Left is better"},
    "pair_choice_right": {"zh": "右图更好", "en": "Right is better"},
    "pair_choice_tie": {"zh": "一样", "en": "Equal"},
    "pair_keyboard_hint": {
        "zh": "键盘：1 或 ← 选左图，2 或 → 选右图，3 或 ↓ 选一样，并跳到下一题；↑ 回到上一题，Enter 保存并继续。",
        "en": "Keyboard: 1 or ← left, 2 or → right, 3 or ↓ equal, each moving to the next question; ↑ goes back a question, Enter saves and goes on.",
    },
    "pair_thanks": {
        "zh": "您已完成全部比较，选择均已保存。您可以关闭此页面，或在下方打开某一组修改。",
        "en": "You have answered every comparison and all your choices are saved. You may close this page, or open one below to revise it.",
    },
    "pair_open": {"zh": "打开第几组（也可点选表格中的一行）", "en": "Open comparison number (or pick a row in the table)"},
    "pair_overview": {"zh": "全部比较", "en": "All comparisons"},
    "pair_review_title": {"zh": "我的选择", "en": "My choices"},
    "pair_status_done": {"zh": "已答", "en": "answered"},
    "pair_status_open": {"zh": "未答", "en": "not answered"},
    "pair_conflict": {
        "zh": "这一组在您打开本页之后，已在另一个标签页或窗口中修改并保存（约 {minutes} 分钟前；保存的选择：{choices}）。"
        "下方保留了本页的选择；再次点击“保存并继续”将用它们覆盖。",
        "en": "This comparison was changed and saved in another tab or window after you opened this page (about {minutes} min ago; "
        "saved choices: {choices}). Your choices on this page are kept below; press Save & next again to overwrite with them.",
    },
}


def text(key: str, lang: str, **fields: object) -> str:
    message = _TEXT[key][lang]
    return message.format(**fields) if fields else message


def dimension_name(key: str, lang: str) -> str:
    dimension = next(d for d in DIMENSIONS if d.key == key)
    return dimension.name_zh if lang == "zh" else dimension.name_en


def dimension_overview(lang: str) -> str:
    """Markdown list of the four dimensions with their lowest and highest anchors, for the instructions."""
    lines = []
    for dimension in DIMENSIONS:
        low, *_, high = ANCHORS[dimension.key][lang]
        lines.append(f"- **{dimension_name(dimension.key, lang)}**: 1 = {low} … 5 = {high}")
    return "\n".join(lines)
