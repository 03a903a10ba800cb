"""Prompt sets, the LLM modernize step (against a local stub server), the CLIP tokenizer and long-prompt encoding."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from fangzhi.cli import main
from fangzhi.errors import FangzhiError
from fangzhi.generate import modernize
from fangzhi.generate.modernize import ModernizeConfig, failures_path_for, modernize_source, parse_reply, read_source_text
from fangzhi.generate.prompts import SHUNTIAN_PROMPT_SET, PromptEntry, load_prompt_set, save_prompt_set

GOOD_ENTRY = {
    "id": "xishan",
    "source": "西山在府西三十里。",
    "narrative_zh": "西山位于北京城西。",
    "prompt_en": "Chinese landscape painting of the Western Hills",
}


# --- prompt-set files ------------------------------------------------------------------------


def test_shipped_shuntian_set_is_valid_and_has_long_prompts():
    from open_clip.tokenizer import SimpleTokenizer

    entries = load_prompt_set(SHUNTIAN_PROMPT_SET)
    assert len(entries) >= 16
    assert len({e.id for e in entries}) == len(entries)
    for entry in entries:
        assert any("\u4e00" <= ch <= "\u9fff" for ch in entry.source), entry.id
        assert any("\u4e00" <= ch <= "\u9fff" for ch in entry.narrative_zh), entry.id
    tokenizer = SimpleTokenizer()
    assert sum(len(tokenizer.encode(e.prompt_en)) > 75 for e in entries) >= 3
    ids = {e.id for e in entries}
    assert {"xishan", "xiangshan", "yuquan", "panshan", "yongding-he", "lugou-qiao", "chaobai-he", "wenyu-he",
            "juyong-guan", "kunming-hu"} <= ids


BAD_YAML = """\
- id: xishan
  source: 西山在府西三十里。
  narrative_zh: 西山位于北京城西。
  prompt_en: Chinese landscape painting of the Western Hills
- id: yuquan
  source: 玉泉山。
  narrative_zh: 玉泉山。
  prompt_en: "  "
- id: panshan
  source: 盘山。
  narrative_zh: 盘山。
  promt_en: Mount Pan
- id: xiangshan
  source: 香山。
  narrative_zh: 香山。
  prompt_en: 香山 in autumn
- id: bad id!
  source: 西山。
  narrative_zh: 西山。
  prompt_en: hills
- id: lugou
  source: 卢沟桥。
  prompt_en: Lugou Bridge
- just a string
- id: kunming
  source: 昆明湖。
  narrative_zh: 昆明湖。
  prompt_en:
"""


def test_yaml_errors_name_entry_field_and_line(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text(BAD_YAML, encoding="utf-8")
    with pytest.raises(FangzhiError) as info:
        load_prompt_set(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 8 problems")
    assert "entry 2 (id 'yuquan', line 5): field 'prompt_en' (line 8): is empty" in message
    assert "entry 3 (id 'panshan', line 9): field 'promt_en' (line 12): unknown field" in message
    assert "entry 3 (id 'panshan', line 9): field 'prompt_en': required but missing" in message
    assert "entry 4 (id 'xiangshan', line 13): field 'prompt_en' (line 16): contains the Chinese" in message
    assert "entry 5 (id 'bad id!', line 17): field 'id' (line 17): 'bad id!' is not a valid id" in message
    assert "entry 6 (id 'lugou', line 21): field 'narrative_zh': required but missing" in message
    assert "entry 7 (line 24): must be a mapping" in message
    assert "entry 8 (id 'kunming', line 25): field 'prompt_en' (line 28): is empty" in message  # a key with nothing after it


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump([GOOD_ENTRY, GOOD_ENTRY], allow_unicode=True), encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"entry 2 .*duplicate id 'xishan' \(first used by entry 1, line 1\)"):
        load_prompt_set(path)
    # reported even when the duplicate has other problems too
    path.write_text(yaml.safe_dump([GOOD_ENTRY, {**GOOD_ENTRY, "source": ""}], allow_unicode=True), encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"2 problems(.|\n)*duplicate id 'xishan'(.|\n)*field 'source'"):
        load_prompt_set(path)


def test_jsonl_errors_give_line_numbers(tmp_path):
    path = tmp_path / "set.jsonl"
    good = json.dumps(GOOD_ENTRY, ensure_ascii=False)
    path.write_text(good + "\n\n{\"id\": \"x\", oops\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"set\.jsonl: line 3: not valid JSON"):
        load_prompt_set(path)
    path.write_text(good + "\n" + json.dumps({**GOOD_ENTRY, "id": "b", "source": ""}) + "\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"entry 2 \(id 'b', line 2\): field 'source': is empty"):
        load_prompt_set(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("a.yaml", "id: x\n", "top level must be a list"),
        ("a.yaml", "", "empty"),
        ("a.yaml", "- [unclosed\n", "not valid YAML"),
        ("a.jsonl", "\n", "contains no entries"),
        ("a.txt", "x", "must end in .yaml, .yml or .jsonl"),
        ("a.yaml", "- id: 西山".encode("gbk"), "not UTF-8"),
    ],
)
def test_malformed_files(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(FangzhiError, match=expected):
        load_prompt_set(path)


@pytest.mark.parametrize("suffix", [".yaml", ".jsonl"])
def test_save_and_load_round_trip(tmp_path, suffix):
    entries = [PromptEntry(**GOOD_ENTRY), PromptEntry(**{**GOOD_ENTRY, "id": "b", "negative": "photo", "notes": "n"})]
    path = save_prompt_set(entries, tmp_path / f"set{suffix}")
    assert load_prompt_set(path) == entries


def test_cli_check(tmp_path, capsys):
    assert main(["prompts", "check", str(SHUNTIAN_PROMPT_SET)]) == 0
    out = capsys.readouterr().out
    assert "valid entries" in out and "encoded in chunks" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{**GOOD_ENTRY, "prompt_en": ""}], allow_unicode=True), encoding="utf-8")
    assert main(["prompts", "check", str(bad)]) == 2
    assert "field 'prompt_en'" in capsys.readouterr().err



def test_check_on_a_folder_says_it_is_a_folder(tmp_path, capsys):
    (tmp_path / "shuntian.yaml").write_text(SHUNTIAN_PROMPT_SET.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["prompts", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder" in err and ".yaml, .yml or .jsonl file" in err and "shuntian.yaml" in err


# --- modernize against a local stub server ---------------------------------------------------


class StubLLM:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1; `script[excerpt]` lists replies to give in turn.

    A reply is ("ok", content) | ("status", code) | ("sleep", seconds); the last one repeats.
    """

    def __init__(self):
        self.script: dict[str, list[tuple[str, object]]] = {}
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.reject_response_format = False
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if stub.reject_response_format and "response_format" in body:
                    return self._send(400, {"error": "response_format is not supported"})
                excerpt = body["messages"][-1]["content"]
                replies = stub.script[excerpt]
                kind, value = replies.pop(0) if len(replies) > 1 else replies[0]
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "ok", json.dumps({"narrative_zh": "迟到的回答。", "prompt_en": "late reply"})
                if kind == "status":
                    return self._send(value, {"error": "server error"})
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": value}}]})

            def _send(self, code, payload):
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def good_reply(narrative: str, prompt: str) -> tuple[str, str]:
    return ("ok", json.dumps({"narrative_zh": narrative, "prompt_en": prompt}, ensure_ascii=False))


SOURCE_TEXT = """# test excerpts
xishan: 西山在府西三十里，
太行之首也。

玉泉山在西山之东麓，泉出石罅。

panshan: 盘山在蓟州西北二十五里。
"""
XISHAN, YUQUAN, PANSHAN = "西山在府西三十里，太行之首也。", "玉泉山在西山之东麓，泉出石罅。", "盘山在蓟州西北二十五里。"


def write_source(tmp_path: Path) -> Path:
    path = tmp_path / "source.txt"
    path.write_text(SOURCE_TEXT, encoding="utf-8")
    return path


def fast_config(stub: StubLLM, tmp_path: Path, **overrides) -> ModernizeConfig:
    settings = dict(base_url=stub.base_url, model="stub-glm", cache_dir=tmp_path / "cache", retries=2,
                    timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.05)
    return ModernizeConfig(**(settings | overrides))


def test_read_source_text_ids_lines_and_errors(tmp_path):
    excerpts = read_source_text(write_source(tmp_path))
    assert [(e.id, e.text, e.line) for e in excerpts] == [
        ("xishan", XISHAN, 2), ("excerpt-002", YUQUAN, 5), ("panshan", PANSHAN, 7)]
    duplicate = tmp_path / "dup.txt"
    duplicate.write_text("a: 甲。\n\na: 乙。\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match=r"dup\.txt: line 3: id 'a' is already used on line 1"):
        read_source_text(duplicate)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match="no excerpts"):
        read_source_text(empty)


def test_parse_reply_accepts_fences_and_rejects_garbage():
    assert parse_reply('Sure!\n```json\n{"narrative_zh": "甲", "prompt_en": "a"}\n```') == {"narrative_zh": "甲", "prompt_en": "a"}
    for garbage in ["no json here", '{"narrative_zh": "甲", ', "[1, 2]"]:
        with pytest.raises(Exception, match="JSON"):
            parse_reply(garbage)


def test_modernize_good_malformed_500_timeout_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FANGZHI_LLM_API_KEY", "sk-test")
    with StubLLM() as stub:
        stub.script = {
            # fenced JSON on the first try
            XISHAN: [("ok", '```json\n{"narrative_zh": "西山在北京西边。", "prompt_en": "Western Hills, ink"}\n```')],
            # malformed JSON, then a reply missing prompt_en, then a 500, then good
            YUQUAN: [("ok", '{"narrative_zh": "玉泉'), good_reply("玉泉。", ""), ("status", 500), good_reply("玉泉山泉水清。", "Jade Spring")],
            # a reply slower than the timeout, then good
            PANSHAN: [("sleep", 1.0), good_reply("盘山有三盘。", "Mount Pan")],
        }
        config = fast_config(stub, tmp_path, timeout_s=0.3, retries=3)
        out = tmp_path / "out" / "prompts.yaml"
        result = modernize_source(write_source(tmp_path), out, config)
        assert result.failures == [] and result.requests == 1 + 4 + 2
        entries = load_prompt_set(out)
        assert [(e.id, e.source, e.prompt_en) for e in entries] == [
            ("xishan", XISHAN, "Western Hills, ink"), ("excerpt-002", YUQUAN, "Jade Spring"), ("panshan", PANSHAN, "Mount Pan")]
        assert all("stub-glm" in e.notes for e in entries)
        assert stub.requests[0]["response_format"] == {"type": "json_object"}
        assert stub.requests[0]["model"] == "stub-glm"
        assert stub.headers[0]["Authorization"] == "Bearer sk-test"
        assert not failures_path_for(out).exists()

        # A rerun is served from the cache: no request reaches the server, and nothing is backed up.
        sent = len(stub.requests)
        rerun = modernize_source(write_source(tmp_path), out, config)
        assert len(stub.requests) == sent and rerun.from_cache == 3 and rerun.notes == []
        assert load_prompt_set(out) == entries

        # A reviewer's hand edit is not overwritten silently: the edited file is kept as a backup.
        out.write_text(out.read_text(encoding="utf-8").replace("Mount Pan", "Mount Pan in snow"), encoding="utf-8")
        rerun = modernize_source(write_source(tmp_path), out, config)
        (backup,) = out.parent.glob("prompts.*.bak.yaml")
        assert "Mount Pan in snow" in backup.read_text(encoding="utf-8") and backup.name in rerun.notes[0]
        assert load_prompt_set(out) == entries


def test_modernize_reports_failures_and_rerun_retries_only_them(tmp_path, capsys):
    with StubLLM() as stub:
        stub.script = {XISHAN: [good_reply("西山。", "Western Hills")], YUQUAN: [("status", 503)],
                       PANSHAN: [("ok", "I cannot answer that.")]}
        source, out = write_source(tmp_path), tmp_path / "prompts.yaml"
        config = tmp_path / "modernize.yaml"
        config.write_text("backoff_s: 0.01\nretries: 3\n", encoding="utf-8")
        argv = ["prompts", "modernize", str(source), "--out", str(out), "--base-url", stub.base_url, "--model", "stub-glm",
                "--cache-dir", str(tmp_path / "cache"), "--retries", "1", "--timeout", "2", "--config", str(config)]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "2 excerpt(s) failed" in err and "excerpt-002 (line 5, 2 attempts): HTTP 503" in err
        assert "panshan (line 7, 2 attempts): reply has no JSON object" in err
        assert [e.id for e in load_prompt_set(out)] == ["xishan"]
        report = yaml.safe_load(failures_path_for(out).read_text(encoding="utf-8"))
        assert [(f["id"], f["source"]) for f in report] == [("excerpt-002", YUQUAN), ("panshan", PANSHAN)]

        stub.script[YUQUAN] = [good_reply("玉泉。", "Jade Spring")]
        stub.script[PANSHAN] = [good_reply("盘山。", "Mount Pan")]
        sent = len(stub.requests)
        assert main(argv) == 0
        assert [body["messages"][-1]["content"] for body in stub.requests[sent:]] == [YUQUAN, PANSHAN]
        assert [e.id for e in load_prompt_set(out)] == ["xishan", "excerpt-002", "panshan"]
        assert not failures_path_for(out).exists()
        assert not list(tmp_path.glob("*.bak.yaml"))  # the first output only gained entries: nothing to back up


def test_cli_modernize_needs_endpoint_and_model(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FANGZHI_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("FANGZHI_LLM_MODEL", raising=False)
    assert main(["prompts", "modernize", str(write_source(tmp_path)), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_modernize_drops_response_format_when_rejected(tmp_path):
    with StubLLM() as stub:
        stub.reject_response_format = True
        stub.script = {text: [good_reply("好。", "fine")] for text in (XISHAN, YUQUAN, PANSHAN)}
        result = modernize_source(write_source(tmp_path), tmp_path / "p.jsonl", fast_config(stub, tmp_path))
        assert not result.failures and "rejected response_format" in result.notes[0]
        assert result.requests == 4 and all("response_format" not in body for body in stub.requests[1:])


def test_modernize_refused_excerpt_fails_without_retry(tmp_path):
    with StubLLM() as stub:
        # HTTP 400 for one excerpt (e.g. a content filter) is that excerpt's failure, not a response_format problem.
        stub.script = {XISHAN: [good_reply("西山。", "hills")], YUQUAN: [("status", 400)], PANSHAN: [good_reply("盘山。", "Pan")]}
        result = modernize_source(write_source(tmp_path), tmp_path / "p.yaml", fast_config(stub, tmp_path))
        assert [(f.id, f.attempts) for f in result.failures] == [("excerpt-002", 1)]
        assert "HTTP 400 (not retried)" in result.failures[0].reason
        yuquan_requests = [body for body in stub.requests if body["messages"][-1]["content"] == YUQUAN]
        assert len(yuquan_requests) == 2 and "response_format" not in yuquan_requests[1]
        assert "response_format" in stub.requests[-1] and result.notes == []


def test_modernize_wrong_url_and_auth_are_clear_errors(tmp_path):
    with StubLLM() as stub:
        config = fast_config(stub, tmp_path, base_url=stub.base_url.removesuffix("/v1"))
        with pytest.raises(FangzhiError, match="HTTP 404: check --base-url"):
            modernize_source(write_source(tmp_path), tmp_path / "p.yaml", config)
        stub.script = {XISHAN: [("status", 401)]}
        with pytest.raises(FangzhiError, match="HTTP 401 .*FANGZHI_LLM_API_KEY"):
            modernize_source(write_source(tmp_path), tmp_path / "p.yaml", fast_config(stub, tmp_path))



def test_modernize_that_produces_nothing_leaves_the_existing_output_alone(tmp_path, capsys):
    with StubLLM() as stub:
        stub.script = {text: [("status", 503)] for text in (XISHAN, YUQUAN, PANSHAN)}
        out = tmp_path / "prompts.yaml"
        out.write_bytes(SHUNTIAN_PROMPT_SET.read_bytes())
        argv = ["prompts", "modernize", str(write_source(tmp_path)), "--out", str(out), "--base-url", stub.base_url,
                "--model", "stub-glm", "--cache-dir", str(tmp_path / "cache"), "--retries", "0"]
        # Twice: a second failed run must not replace the first run's backup (or the output) either.
        for _ in range(2):
            assert main(argv) == 1
            assert out.read_bytes() == SHUNTIAN_PROMPT_SET.read_bytes()
            assert "3 excerpt(s) failed" in capsys.readouterr().err
            report = yaml.safe_load(failures_path_for(out).read_text(encoding="utf-8"))
            assert [f["id"] for f in report] == ["xishan", "excerpt-002", "panshan"]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "prompts.failures.yaml", "prompts.yaml", "source.txt"]

        fresh = tmp_path / "new" / "fresh.jsonl"
        result = modernize_source(write_source(tmp_path), fresh, fast_config(stub, tmp_path, retries=0))
        assert not fresh.exists() and len(result.failures) == 3 and failures_path_for(fresh).is_file()
        assert "fresh.jsonl was not written" in result.notes[0]


def test_modernize_backups_within_one_second_keep_every_old_output(tmp_path, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2025, 1, 1, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(modernize, "datetime", FrozenClock)
    with StubLLM() as stub:
        stub.script = {text: [good_reply("好。", "fine")] for text in (XISHAN, YUQUAN, PANSHAN)}
        out = tmp_path / "prompts.yaml"
        config = fast_config(stub, tmp_path)
        modernize_source(write_source(tmp_path), out, config)
        for edit in ("first edit", "second edit"):
            out.write_text(out.read_text(encoding="utf-8").replace("fine", edit, 1), encoding="utf-8")
            modernize_source(write_source(tmp_path), out, config)
        backups = [path.read_text(encoding="utf-8") for path in tmp_path.glob("prompts.*.bak.yaml")]
        assert len(backups) == 2
        assert any("first edit" in text for text in backups) and any("second edit" in text for text in backups)


@pytest.mark.parametrize("base_url", ["127.0.0.1:9", "localhost:8000/v1", "ftp://127.0.0.1/v1", "http://", "http:///v1"])
def test_modernize_rejects_a_base_url_without_scheme_or_host_before_any_request(tmp_path, capsys, base_url):
    out = tmp_path / "p.yaml"
    argv = ["prompts", "modernize", str(write_source(tmp_path)), "--out", str(out), "--base-url", base_url,
            "--model", "m", "--cache-dir", str(tmp_path / "cache"), "--retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'base_url'" in err and "--base-url" in err and json.dumps(base_url) in err and "http://" in err
    assert not out.exists() and not failures_path_for(out).exists()
    assert ModernizeConfig(base_url="https://open.bigmodel.cn/api/paas/v4", model="m").base_url.startswith("https://")


# --- CLIP tokenizer and long-prompt encoding -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from fangzhi.models.tokenizer import clip_tokenizer_from_open_clip_bpe

    return clip_tokenizer_from_open_clip_bpe(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, eos_token_id=49407)
    return CLIPTextModel(config).eval()


def test_tokenizer_matches_open_clip_and_published_ids(tokenizer, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    # Published CLIP ids for this sentence (the SD v1.5 tokenizer gives the same).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = SimpleTokenizer()
    for text in ["Chinese landscape painting of the Western Hills, ink wash on silk",
                 "Lugou Bridge's 501 carved stone lions at dawn!", "Don't   SHOUT: it's Mount Pan's 3 tiers."]:
        assert tokenizer(text).input_ids == [49406, *reference.encode(text), 49407]
    reloaded = CLIPTokenizer.from_pretrained(tokenizer.name_or_path)
    assert reloaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


LONG_PROMPT = ", ".join(f"mountain peak number {i} with pine trees" for i in range(14))  # > 77 tokens


def diffusers_style(tokenizer, text_encoder, prompt):
    """What StableDiffusionPipeline does with a plain prompt string: pad/truncate to 77 and encode."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_short_prompt_matches_diffusers_encoding(tokenizer, text_encoder):
    from fangzhi.generate.text_encoding import encode_prompts

    prompt = "Chinese landscape painting of Xiangshan in autumn"
    for mode in ("chunk", "truncate"):
        embeddings, chunked = encode_prompts(tokenizer, text_encoder, [prompt], mode=mode)
        assert embeddings.shape == (1, 77, 32) and chunked == [False]
        torch.testing.assert_close(embeddings, diffusers_style(tokenizer, text_encoder, prompt))


def test_text_past_token_77_changes_conditioning_only_when_chunking(tokenizer, text_encoder):
    from fangzhi.generate.text_encoding import encode_prompts

    assert len(tokenizer(LONG_PROMPT).input_ids) > 77
    variant_a, variant_b = LONG_PROMPT + ", snow on the ridge", LONG_PROMPT + ", red leaves by the river"
    chunked_a, flags = encode_prompts(tokenizer, text_encoder, [variant_a])
    chunked_b, _ = encode_prompts(tokenizer, text_encoder, [variant_b])
    assert flags == [True] and chunked_a.shape == (1, 154, 32)
    torch.testing.assert_close(chunked_a[:, :77], chunked_b[:, :77])  # first 75 tokens are the same
    assert (chunked_a[:, 77:] - chunked_b[:, 77:]).abs().max() > 1e-3  # the tail is seen

    truncated_a, flags = encode_prompts(tokenizer, text_encoder, [variant_a], mode="truncate")
    truncated_b, _ = encode_prompts(tokenizer, text_encoder, [variant_b], mode="truncate")
    assert flags == [False] and truncated_a.shape == (1, 77, 32)
    torch.testing.assert_close(truncated_a, truncated_b)
    torch.testing.assert_close(truncated_a, diffusers_style(tokenizer, text_encoder, variant_a))


def test_mixed_lengths_pad_with_empty_chunks(tokenizer, text_encoder):
    from fangzhi.generate.text_encoding import encode_prompt_pair, encode_prompts

    embeddings, chunked = encode_prompts(tokenizer, text_encoder, [LONG_PROMPT, "ink mountains"])
    assert embeddings.shape == (2, 154, 32) and chunked == [True, False]
    torch.testing.assert_close(embeddings[1, :77], diffusers_style(tokenizer, text_encoder, "ink mountains")[0])
    torch.testing.assert_close(embeddings[1, 77:], diffusers_style(tokenizer, text_encoder, "")[0])

    prompt_embeds, negative_embeds, chunked = encode_prompt_pair(tokenizer, text_encoder, [LONG_PROMPT], [""])
    assert prompt_embeds.shape == negative_embeds.shape == (1, 154, 32) and chunked == [True]
    torch.testing.assert_close(negative_embeds[0, 77:], negative_embeds[0, :77])


def test_chunked_embeddings_drive_a_diffusers_pipeline(tmp_path):
    from fangzhi.generate.text_encoding import encode_prompt_pair
    from fangzhi.models import build_tiny_base, load_pipeline

    pipe = load_pipeline(str(build_tiny_base(tmp_path / "tiny", seed=0)))
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, negative_embeds, chunked = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, [LONG_PROMPT], [""])
    assert chunked == [True]
    images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=2,
                  height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
