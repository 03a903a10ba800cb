"""The `fangzhi` command: parses arguments and calls one public function per command.

User errors (FangzhiError) print one message and exit with status 2; no traceback.
Heavy libraries are imported inside the handlers so `fangzhi --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from fangzhi.errors import FangzhiError


def _cmd_base(args: argparse.Namespace) -> int:
    from fangzhi.models import build_sd15_random_base, build_tiny_base

    build = build_tiny_base if args.kind == "tiny" else build_sd15_random_base
    path = build(args.out, seed=args.seed)
    print(f"wrote {args.kind} base to {path}")
    return 0


def _add_base(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("base", help="write an offline Stable Diffusion base (tiny, or SD v1.5 architecture with random weights)")
    p.add_argument("kind", choices=["tiny", "sd15-random"], help="tiny: a few MB, trains on CPU; sd15-random: SD v1.5's full configs, random weights")
    p.add_argument("--out", required=True, help="folder to write (a normal diffusers pipeline folder)")
    p.add_argument("--seed", type=int, default=0, help="weights seed; the same seed gives the same bytes")
    p.set_defaults(func=_cmd_base)


def _cmd_dataset_check(args: argparse.Namespace) -> int:
    from fangzhi.data import check_dataset

    report = check_dataset(args.folder, resolution=args.resolution, allow_upscale=args.allow_upscale)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_dataset_select(args: argparse.Namespace) -> int:
    from fangzhi.data import select_subset

    copied = select_subset(args.src, args.n, args.out, seed=args.seed)
    print(f"copied {len(copied)} images (seed {args.seed}) from {args.src} to {args.out}")
    return 0


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="check a folder of captioned training images, or copy a random subset of it")
    dataset_sub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = dataset_sub.add_parser("check", help="list every problem (unreadable, too small, uncaptioned, duplicate...); exit 1 if any is an error")
    check.add_argument("folder", help="dataset folder: images with name.txt captions and/or metadata.jsonl")
    check.add_argument("--resolution", type=int, default=512, help="training resolution; images with a shorter side are errors (default 512)")
    check.add_argument("--allow-upscale", action="store_true", help="report images smaller than --resolution as notes, not errors")
    check.set_defaults(func=_cmd_dataset_check)
    select = dataset_sub.add_parser("select", help="copy a reproducible random subset of images and captions to a new folder")
    select.add_argument("src", help="source dataset folder")
    select.add_argument("--n", type=int, required=True, help="how many images to copy")
    select.add_argument("--out", required=True, help="new (or empty) folder to copy into")
    select.add_argument("--seed", type=int, default=0, help="the same seed and source give the same subset (default 0)")
    select.set_defaults(func=_cmd_dataset_select)


def _comma_list(convert, example: str):
    """An argparse type for comma-separated values such as 2,4,6."""

    def parse(text: str) -> list:
        try:
            return [convert(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values such as {example}, got '{text}'") from None

    return parse


_int_list = _comma_list(int, "2,4,6")
_float_list = _comma_list(float, "0.5,1")


def _arm_alias(text: str) -> tuple[str, str]:
    source, sep, target = text.partition("=")
    if not sep or not source.strip() or not target.strip():
        raise argparse.ArgumentTypeError(f"expected FROM=TO such as LoRA=lora, got '{text}'")
    return source.strip(), target.strip()


def _cmd_analyze(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config

    if args.mode == "power" and args.power_mode == "pairwise":
        from fangzhi.evaluate.pairwise_power import PairwisePowerConfig, run_pairwise_power

        _reject_flags(args, ABSOLUTE_POWER_FLAGS, "not used with analyze power --mode pairwise")
        config = load_config(
            PairwisePowerConfig,
            args.config,
            {
                "win_rate": args.win_rate, "power": args.power, "alpha": args.alpha, "raters": args.raters, "comparisons": args.comparisons,
                "tie_share": args.tie_share, "comparison_sd": args.comparison_sd, "sims": args.sims, "seed": args.seed, "out": args.out,
            },
        )
        print(run_pairwise_power(config)[2])
        return 0
    _reject_flags(args, PAIRWISE_POWER_FLAGS, "only used with analyze power --mode pairwise")
    if args.mode == "power":
        from fangzhi.evaluate.analyze import PowerConfig, run_power

        config = load_config(
            PowerConfig,
            args.config,
            {
                "from_ratings": args.from_ratings, "from_db": args.db, "baseline_arm": args.baseline_arm, "diff": args.diff,
                "power": args.power, "alpha": args.alpha, "raters": args.raters, "prompts": args.prompts,
                "seeds_per_prompt": args.seeds_per_prompt, "sims": args.sims, "seed": args.seed, "out": args.out,
                **{f"components.{name}": getattr(args, name) for name in POWER_COMPONENT_FLAGS},
            },
        )
        print(run_power(config)[2])
        return 0
    if args.power_mode is not None:
        raise FangzhiError("--mode applies to 'analyze power'; the analysis itself recognises a pairwise votes file by its columns")

    from fangzhi.evaluate.analyze import AnalyzeConfig, run_analyze

    if not args.out and not args.config:
        raise FangzhiError("analyze: --out DIR is required (the folder for tables, plots and report, e.g. results/NAME)")
    config = load_config(
        AnalyzeConfig,
        args.config,
        {
            "db": args.db, "ratings": args.ratings, "out": args.out, "sd_over": args.sd_over,
            "drop_bad_rows": args.drop_bad_rows or None, "include_revoked": args.include_revoked or None,
            "exclude_failed_attention": args.exclude_failed_attention, "clip": args.clip, "baseline_arm": args.baseline_arm,
            "bootstrap": args.bootstrap, "seed": args.seed, "title_note": args.title_note,
            "arm_alias": dict(args.arm_alias) if args.arm_alias else None, "mixed_model": False if args.no_mixed_model else None,
            "arm_order": args.arm_order,
        },
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out, headline = run_analyze(config)
    for warning in caught:  # e.g. the list of dropped bad rows: shown as plain text, not as a Python warning
        print(f"warning: {warning.message}", file=sys.stderr)
    print(headline.read_text(encoding="utf-8"))
    print(f"wrote {out}")
    return 0


def _reject_flags(args: argparse.Namespace, flags: dict[str, str], reason: str) -> None:
    given = [flag for name, flag in flags.items() if getattr(args, name) is not None]
    if given:
        raise FangzhiError(f"{', '.join(given)}: {reason}")


POWER_COMPONENT_FLAGS: dict[str, str] = {
    "base_mean": "baseline mean score (default 3.2)",
    "rater_sd": "SD of rater leniency (default 0.4)",
    "prompt_sd": "SD of the prompt effect shared by both arms (default 0.4)",
    "seed_sd": "SD of the seed effect within a prompt, shared by both arms (default 0.3)",
    "image_sd": "SD of the image's own effect, shared by its raters (default 0.3)",
    "rater_arm_sd": "SD of a rater's own LoRA − base difference (default 0.1)",
    "prompt_arm_sd": "SD of a prompt's own LoRA − base difference (default 0.2)",
    "noise_sd": "SD of per-rating noise (default 0.7)",
}


ABSOLUTE_POWER_FLAGS: dict[str, str] = {
    "from_ratings": "--from-ratings", "db": "--db", "diff": "--diff", "prompts": "--prompts", "seeds_per_prompt": "--seeds-per-prompt",
    "baseline_arm": "--reference-arm", **{name: f"--{name.replace('_', '-')}" for name in POWER_COMPONENT_FLAGS},
}
PAIRWISE_POWER_FLAGS: dict[str, str] = {
    "win_rate": "--win-rate", "comparisons": "--comparisons", "tie_share": "--tie-share", "comparison_sd": "--comparison-sd",
}


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="human ratings: Table 2 (mean ± SD), paired tests, reliability, report; or 'analyze power' to plan a study")
    p.add_argument("mode", nargs="?", choices=["power"], help="power: how many raters × prompts (or pairwise comparisons) a study needs (simulation)")
    p.add_argument("--config", help="YAML/TOML file with the same keys as the flags (flags win)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--db", help="rating study DuckDB written by the rating app")
    source.add_argument("--ratings", help="wide ratings file (.csv or .parquet): rater,arm,prompt,seed,style,match,detail,beauty")
    p.add_argument("--out", help="output folder, e.g. results/NAME (required for the analysis; optional for power)")
    p.add_argument("--sd-over", choices=["images", "ratings", "raters"], help="unit of the table's SD (default images: each image's score is its raters' mean)")
    p.add_argument("--drop-bad-rows", action="store_true", help="analyse without bad rows instead of stopping (they are still listed)")
    p.add_argument("--include-revoked", action="store_true", help="with --db: keep the ratings of raters whose access was revoked (left out by default)")
    p.add_argument("--exclude-failed-attention", type=int, metavar="N", help="leave out raters with N or more failed attention checks (default: keep everyone)")
    p.add_argument("--clip", help="clip_scores.csv from the CLIP scorer, for CLIP vs human correlations and scatter")
    p.add_argument("--reference-arm", "--baseline-arm", dest="baseline_arm",
                   help="arm the others are compared against; in a pairwise analysis the arm fixed at Elo 1000 (default base)")
    p.add_argument("--arm-order", type=_comma_list(str, "base,lora@0.5,lora@1"),
                   help="order of the arms in the tables and for the adjacent-arm tests, e.g. base,lora@0.5,lora@1 (default: reference arm, then alphabetical)")
    p.add_argument("--arm-alias", action="append", type=_arm_alias, metavar="FROM=TO", help="read arm FROM as arm TO, e.g. LoRA=lora (repeatable)")
    p.add_argument("--no-mixed-model", action="store_true", help="skip the crossed mixed model (the prompt-level tests stay)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the 95%% CI of the mean difference (default 10000)")
    p.add_argument("--seed", type=int, help="random seed for the bootstrap / simulation (default 0)")
    p.add_argument("--title-note", help="added to every title, e.g. 'simulated'")
    power = p.add_argument_group("power (with 'analyze power')")
    power.add_argument("--mode", dest="power_mode", choices=["absolute", "pairwise"],
                       help="absolute: 1–5 scores, Wilcoxon on prompts (default); pairwise: side-by-side votes, prompt-level test")
    power.add_argument("--from-ratings", help="estimate the SDs below from this wide ratings file (or from --db) with the crossed mixed model")
    power.add_argument("--diff", type=float, help="mean score difference to detect (default 0.3)")
    power.add_argument("--power", type=float, help="target power (default 0.8)")
    power.add_argument("--alpha", type=float, help="significance level (default 0.05)")
    power.add_argument("--raters", type=_int_list, help="rater counts to try, e.g. 2,4,6 (each ≥ 1)")
    power.add_argument("--prompts", type=_int_list, help="prompt counts to try, e.g. 8,16,32 (each ≥ 2; the prompt is the test's unit)")
    power.add_argument("--seeds-per-prompt", type=int, help="images per prompt and arm (default 1)")
    power.add_argument("--sims", type=int, help="simulated studies per design (default 500)")
    for name, text in POWER_COMPONENT_FLAGS.items():
        power.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"without --from-ratings/--db: {text}")
    power.add_argument("--win-rate", type=float, help="--mode pairwise: win rate to detect, ties as half (default 0.6)")
    power.add_argument("--comparisons", type=_int_list, help="--mode pairwise: comparisons (prompt × seed units) of the arm pair to try, e.g. 20,40,80")
    power.add_argument("--tie-share", type=float, help="--mode pairwise: share of votes that are ties (default 0.2)")
    power.add_argument("--comparison-sd", type=float, help="--mode pairwise: SD of the per-comparison logit shift (default 0)")
    p.set_defaults(func=_cmd_analyze)


def _cmd_prompts_check(args: argparse.Namespace) -> int:
    from fangzhi.generate.prompts import check_prompt_set

    print(check_prompt_set(args.file))
    return 0


def _cmd_prompts_modernize(args: argparse.Namespace) -> int:
    import os

    from fangzhi.config import load_config
    from fangzhi.generate.modernize import ModernizeConfig, modernize_source

    overrides = {
        "base_url": args.base_url or os.environ.get("FANGZHI_LLM_BASE_URL"),
        "model": args.model or os.environ.get("FANGZHI_LLM_MODEL"),
        "api_key_env": args.api_key_env,
        "cache_dir": args.cache_dir,
        "retries": args.retries,
        "timeout_s": args.timeout,
    }
    if args.config is None and (overrides["base_url"] is None or overrides["model"] is None):
        raise FangzhiError(
            "modernize needs the chat endpoint and model: pass --base-url URL and --model NAME "
            "(or set FANGZHI_LLM_BASE_URL and FANGZHI_LLM_MODEL)"
        )
    config = load_config(ModernizeConfig, args.config, overrides)
    result = modernize_source(args.source, args.out, config)
    for note in result.notes:
        print(f"note: {note}")
    if result.entries:
        print(
            f"wrote {len(result.entries)} entries to {result.out_path} "
            f"({result.from_cache} from the cache, {result.requests} requests to {config.model})"
        )
    if result.failures:
        print(f"{len(result.failures)} excerpt(s) failed and are not in {result.out_path}:", file=sys.stderr)
        for failure in result.failures:
            print(f"  {failure.id} (line {failure.line}, {failure.attempts} attempts): {failure.reason}", file=sys.stderr)
        print(f"listed in {result.failures_path}; rerun the same command to retry only these", file=sys.stderr)
        return 1
    return 0


def _add_prompts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="check a prompt set, or write one from classical excerpts with an LLM")
    prompts_sub = p.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    check = prompts_sub.add_parser("check", help="validate a prompt set (.yaml/.jsonl); print its size or every problem")
    check.add_argument("file", help="prompt set, e.g. fangzhi/generate/prompts/shuntian.yaml")
    check.set_defaults(func=_cmd_prompts_check)
    modernize = prompts_sub.add_parser(
        "modernize",
        help="turn classical excerpts into narrative_zh + prompt_en with any OpenAI-compatible chat endpoint; exit 1 if any fail",
    )
    modernize.add_argument("source", help="UTF-8 text, one excerpt per paragraph, optionally 'id: text' (docs/formats.md)")
    modernize.add_argument("--out", required=True, help="prompt set to write (.yaml or .jsonl); failures go to OUT_STEM.failures.yaml")
    modernize.add_argument("--base-url", help="API root, e.g. http://127.0.0.1:8000/v1 (default $FANGZHI_LLM_BASE_URL)")
    modernize.add_argument("--model", help="model name, e.g. glm-4-flash (default $FANGZHI_LLM_MODEL)")
    modernize.add_argument("--api-key-env", help="environment variable holding the API key (default FANGZHI_LLM_API_KEY; unset: no key)")
    modernize.add_argument("--cache-dir", help="reply cache (default $XDG_CACHE_HOME/fangzhi/modernize)")
    modernize.add_argument("--retries", type=int, help="extra attempts per excerpt (default 4)")
    modernize.add_argument("--timeout", type=float, help="seconds to wait for one reply (default 60)")
    modernize.add_argument("--config", help="YAML/TOML file with ModernizeConfig keys; flags and env override it")
    modernize.set_defaults(func=_cmd_prompts_modernize)


def _cmd_train(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.train import TrainConfig, train

    overrides = {
        "base": args.base,
        "base_config": args.base_config,
        "output_dir": args.output_dir,
        "data.path": args.data,
        "data.resolution": args.resolution,
        "data.trigger": args.trigger,
        "data.skip_bad_files": args.skip_bad_files or None,
        "lora.rank": args.rank,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": args.optimizer,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing or None,
        "compile": args.compile or None,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
        "resume": args.resume,
    }
    train(load_config(TrainConfig, args.config, overrides, section="train"))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a style LoRA (UNet cross-attention + CLIP text encoder) on a folder of captioned paintings",
        description="Train a style LoRA. Settings come from --config (YAML/TOML; see configs/paper.yaml), "
        "then these flags override single keys. The resolved config is saved as OUTPUT_DIR/config.yaml.",
    )
    p.add_argument("--config", help="YAML or TOML config file (keys as in configs/paper.yaml)")
    p.add_argument("--base", help="Hub id, local diffusers folder, or .safetensors/.ckpt checkpoint (default: SD v1.5's Hub id)")
    p.add_argument("--base-config", help="for a .safetensors/.ckpt base: a diffusers folder (or Hub id) with its configs; default SD v1.5's from the HF cache")
    p.add_argument("--data", help="dataset folder (images + name.txt captions and/or metadata.jsonl)")
    p.add_argument("--output-dir", help="where the LoRA, logs and checkpoints go")
    p.add_argument("--resolution", type=int)
    p.add_argument("--trigger", help="trigger phrase put before every caption, e.g. 'shuntianfuzhi style'")
    p.add_argument("--skip-bad-files", action="store_true", help="train on the good images when the dataset check finds errors")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"])
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and text encoder (faster steps after a one-off compile)")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between resumable checkpoints")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="'latest' or a checkpoint folder (OUTPUT_DIR/checkpoints/step-N)")
    p.set_defaults(func=_cmd_train)


def _cmd_lora_export(args: argparse.Namespace) -> int:
    from fangzhi.train import export_kohya

    print(f"wrote {export_kohya(args.lora, args.out, alpha=args.alpha)} (kohya format: loads in A1111, ComfyUI and diffusers)")
    return 0


def _add_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="convert a trained LoRA for other tools")
    lora_sub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    export = lora_sub.add_parser("export", help="write the LoRA in another key format")
    export.add_argument("lora", help="pytorch_lora_weights.safetensors or the training output folder")
    export.add_argument("--format", choices=["kohya"], default="kohya", help="kohya: lora_unet_*/lora_te_* keys with .alpha, as A1111 and ComfyUI load")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--alpha", type=float, help="the LoRA alpha it was trained with; needed when the file has no lora_adapter_metadata")
    export.set_defaults(func=_cmd_lora_export)


def _cmd_study_create(args: argparse.Namespace) -> int:
    from fangzhi.rating_app.study import create_study, links_file

    links_path = links_file(args.db, args.links_out)
    links = create_study(
        args.manifest, args.db, args.raters, reference_images=args.reference_images, lang=args.lang,
        qc_retest=args.qc_retest, qc_attention=args.qc_attention, seed=args.seed, base_url=args.base_url, mode=args.mode,
        links_out=links_path,
    )
    print(f"created {args.db} with {len(links)} raters; invitation links (only shown now; also saved to {links_path}):")
    for name, _token, link in links:
        print(f"  {name}\t{link}")
    return 0


def _cmd_study_export(args: argparse.Namespace) -> int:
    from fangzhi.studydb import export_ratings

    rows, study = export_ratings(args.db, args.out)
    print(f"wrote {rows} ratings to {args.out}, read from {study.source}")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="create a blind rating study from a generation manifest, or export its ratings")
    study_sub = p.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    create = study_sub.add_parser("create", help="make the study database and one secret invitation link per rater")
    create.add_argument("--manifest", required=True, help="generation manifest (OUT/manifest.jsonl from `fangzhi generate`)")
    create.add_argument("--db", required=True, help="new study database file, e.g. study.duckdb (never overwritten)")
    create.add_argument("--raters", required=True, help="text file with one rater name per line")
    create.add_argument("--reference-images", help="folder of a few paintings in the target style, shown beside every item")
    create.add_argument("--lang", choices=["zh", "en"], default="zh", help="the app's default language (raters can switch; default zh)")
    create.add_argument("--qc-retest", type=int, default=3, help="images each rater sees a second time, for test-retest (default 3)")
    create.add_argument("--qc-attention", type=int, default=2, help="attention-check pages per rater (default 2)")
    create.add_argument("--seed", type=int, default=0, help="study seed; each rater's order is seeded from it (default 0)")
    create.add_argument("--mode", choices=["absolute", "pairwise"], default="absolute",
                        help="absolute: each image scored 1-5 (default); pairwise: two images side by side, left / right / equal per question")
    create.add_argument("--base-url", default="http://localhost:8501", help="where raters reach the app, for the links")
    create.add_argument("--links-out", help="CSV of rater,token,link for the admin (default: DB with .links.csv)")
    create.set_defaults(func=_cmd_study_create)
    export = study_sub.add_parser("export", help="write one row per rater x item (wide format), also while the app runs")
    export.add_argument("--db", required=True, help="study database")
    export.add_argument("--out", required=True, help="ratings.csv or ratings.parquet (written anew from the study; an existing file of that name is replaced)")
    export.set_defaults(func=_cmd_study_export)


def _cmd_rate(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.rating_app.serve import RateConfig, serve

    config = load_config(
        RateConfig, None, {"db": args.db, "host": args.host, "port": args.port, "base_url": args.base_url, "links_out": args.links_out}
    )
    return serve(config)


def _add_rate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rate", help="start the blind rating web app (Streamlit) on a study database")
    p.add_argument("--db", required=True, help="study database from `fangzhi study create`")
    p.add_argument("--port", type=int, help="port (default 8501)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a network)")
    p.add_argument(
        "--base-url",
        help="where raters reach the app, e.g. https://rating.example.org/study behind your HTTPS proxy: used for the links "
        "of raters added on the admin page, and its path (if any) is the path the app serves under (default http://localhost:PORT)",
    )
    p.add_argument("--links-out", help="CSV that links of raters added on the admin page are appended to (default: DB with .links.csv)")
    p.set_defaults(func=_cmd_rate)


def _cmd_clip_score(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.evaluate.clip_score import ClipScoreConfig, run_clip_score

    config = load_config(
        ClipScoreConfig,
        args.config,
        {
            "manifest": args.manifest, "out": args.out, "reference_images": args.reference_images, "model": args.model,
            "pretrained": args.pretrained, "batch_size": args.batch_size, "device": args.device,
        },
    )
    run_clip_score(config)
    return 0


def _cmd_clip_check(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.evaluate.clip_check import ClipCheckConfig, clip_check

    config = load_config(
        ClipCheckConfig,
        args.config,
        {
            "images": args.images, "baseline": args.baseline, "update_baseline": args.update_baseline or None,
            "tolerance": args.tolerance, "style_tolerance": args.style_tolerance, "alpha": args.alpha,
            "collapse_drop": args.collapse_drop, "style_collapse_drop": args.style_collapse_drop,
            "collapse_max_images": args.collapse_max_images, "baseline_arm": args.baseline_arm,
            "model": args.model, "pretrained": args.pretrained, "reference_images": args.reference_images,
            "batch_size": args.batch_size, "device": args.device, "out": args.out,
        },
    )
    return clip_check(config)


def _add_clip_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML file with the same keys as the flags (flags win)")
    p.add_argument("--reference-images", help="folder of style reference images, for style similarity")
    p.add_argument("--model", help="open_clip architecture (default ViT-L-14; unused when --pretrained is a folder)")
    p.add_argument("--pretrained", help="open_clip tag (default openai), a local checkpoint file, or a folder with open_clip_config.json + weights")
    p.add_argument("--batch-size", type=int, help="images per batch (default 16)")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda, cuda:1, ...")


def _add_clip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clip-score", help="CLIP score (100 × cosine to the English prompt) and style similarity for every image of a manifest")
    p.add_argument("--manifest", help="generation manifest (manifest.jsonl)")
    p.add_argument("--out", help="output folder: clip_scores.csv (for analyze --clip) and clip_summary.json")
    _add_clip_model_flags(p)
    p.set_defaults(func=_cmd_clip_score)

    p = sub.add_parser("clip-check", help="CI gate: compare a manifest's CLIP numbers with a stored baseline (exit 0 pass, 1 regression, 2 bad input)")
    p.add_argument("--images", help="generation manifest (manifest.jsonl) of the fixed prompt/seed set")
    p.add_argument("--baseline", help="baseline JSON, e.g. results/clip_baseline.json")
    p.add_argument("--update-baseline", action="store_true", help="accept the current numbers as the baseline (overwrites it)")
    p.add_argument("--tolerance", type=float, help="allowed mean drop in CLIP score per arm and in the arm − base difference, in points (default: the baseline's, else 0.5)")
    p.add_argument("--style-tolerance", type=float, help="the same for style similarity, in cosine (default: the baseline's, else 0.005)")
    p.add_argument("--alpha", type=float, help="level of the one-sided paired Wilcoxon tests (default: the baseline's, else 0.05)")
    p.add_argument("--collapse-drop", type=float, help="an image whose CLIP score drops by more than this has collapsed (default: the baseline's, else 5)")
    p.add_argument("--style-collapse-drop", type=float, help="the same for style similarity (default: the baseline's, else 0.05)")
    p.add_argument("--collapse-max-images", type=int, help="more collapsed images than this fails the gate (default: the baseline's, else 2)")
    p.add_argument("--baseline-arm", help="arm the others' differences are taken against (default: the baseline's, else base)")
    p.add_argument("--out", help="report JSON (default clip_check.json beside the manifest)")
    _add_clip_model_flags(p)
    p.set_defaults(func=_cmd_clip_check)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, args.config, {"out": args.out}), simulate_ratings=args.simulate_ratings, fresh=args.fresh, mode=args.mode)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole study in one command: base, LoRA, paired images, CLIP scores, rating study, report",
        description="Runs every stage of the study. Without --config: offline on the CPU with the tiny base and the "
        "bundled paintings and prompts (configs/tiny.yaml spells out these defaults). --config configs/paper.yaml: "
        "SD v1.5 with the paper's settings (needs the weights and a GPU). Finished stages are reused when their "
        "settings are unchanged.",
    )
    p.add_argument("--config", help="study config (sections train/generate/clip/study, top-level base/out)")
    p.add_argument("--out", help="output folder (default results/demo)")
    p.add_argument("--simulate-ratings", action="store_true", help="fill the study with SIMULATED ratings so the analysis can be seen (labelled simulated everywhere)")
    p.add_argument("--mode", choices=["absolute", "pairwise"], default="absolute",
                   help="with --simulate-ratings: absolute (1–5 scores, default) or pairwise (side-by-side votes, Bradley–Terry)")
    p.add_argument("--fresh", action="store_true", help="run every stage again (an earlier rating study and its links are kept aside, never deleted)")
    p.set_defaults(func=_cmd_demo)


def _cmd_generate(args: argparse.Namespace) -> int:
    from fangzhi.config import load_config
    from fangzhi.generate.config import GenerateConfig, lora_arms_from_specs
    from fangzhi.generate.run import generate

    if args.lora_scale and not args.lora:
        raise FangzhiError("--lora-scale applies to --lora flags; in a config file give loras: [{path: ..., scale: ...}]")
    width = height = None
    if args.size:
        width_text, _, height_text = args.size.lower().partition("x")
        try:
            width, height = int(width_text), int(height_text or width_text)
        except ValueError:
            raise FangzhiError(f"--size: expected 512 or 512x768, got '{args.size}'") from None
    overrides = {
        "base": args.base, "base_config": args.base_config, "prompts": args.prompts, "seeds": args.seeds, "out": args.out, "steps": args.steps,
        "guidance_scale": args.cfg, "width": width, "height": height, "negative": args.negative,
        "batch_size": args.batch_size, "trigger": args.trigger, "trigger_arms": args.trigger_arms, "dtype": args.dtype,
        "compile": args.compile or None, "long_prompts": "truncate" if args.truncate_long_prompts else None,
        "limit_prompts": args.limit_prompts, "contact_sheets": False if args.no_contact_sheets else None,
        "loras": lora_arms_from_specs(args.lora, args.lora_scale) if args.lora else None,
    }
    generate(load_config(GenerateConfig, args.config, overrides, section="generate"))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="paired images: a base arm and one arm per LoRA (and scale) for every prompt × seed, with a manifest",
        description="For every prompt × seed, one image per arm with the same seed, scheduler, steps, CFG, size and text. "
        "Defaults are the paper's (DDIM, 35 steps, CFG 7, 512x512, 'shuntianfuzhi style, PROMPT' in both arms). "
        "Rerunning into the same --out skips finished images. Multi-GPU: accelerate launch -m fangzhi generate ...",
    )
    p.add_argument("--config", help="YAML/TOML file with GenerateConfig keys (flags win)")
    p.add_argument("--base", help="Hub id, diffusers folder, or .safetensors/.ckpt checkpoint")
    p.add_argument("--base-config", help="for a .safetensors/.ckpt base: a diffusers folder (or Hub id) with its configs; default SD v1.5's from the HF cache")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE[:LABEL]]",
                   help="LoRA file or training folder, optionally with scale and arm label (e.g. out/lora:0.5:half); repeat for more arms")
    p.add_argument("--lora-scale", type=_float_list, help="scales for --lora flags without one; each gives an arm, e.g. 0.5,1 (default 1)")
    p.add_argument("--prompts", help="prompt set .yaml/.jsonl (default: the shipped Shuntian set)")
    p.add_argument("--limit-prompts", type=int, metavar="N", help="use only the first N prompts")
    p.add_argument("--seeds", help="e.g. 0-3 or 0,2,5 (default 0-3)")
    p.add_argument("--out", help="output folder: images/, manifest.jsonl, contact_sheets/")
    p.add_argument("--steps", type=int, help="DDIM steps (default 35)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    p.add_argument("--size", help="512 or WIDTHxHEIGHT, multiples of 8 (default 512)")
    p.add_argument("--negative", help="negative prompt for entries without one (default empty)")
    p.add_argument("--batch-size", type=int, help="images per UNet call (default 4)")
    p.add_argument("--trigger", help="trigger phrase put before each prompt (default 'shuntianfuzhi style'; '' for none)")
    p.add_argument("--trigger-arms", choices=["both", "lora"], help="arms whose text gets the trigger (default both)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--truncate-long-prompts", action="store_true", help="cut prompts at 75 CLIP tokens instead of encoding them in chunks")
    p.add_argument("--no-contact-sheets", action="store_true", help="skip OUT/contact_sheets/<prompt_id>.png")
    p.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fangzhi",
        description="fangzhi (方志): teach Stable Diffusion a painting style with LoRA, generate paired base/LoRA images, "
        "rate them blind, and analyse the ratings. Commands are listed in the order the data flows.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_demo, _add_base, _add_dataset, _add_train, _add_lora, _add_prompts, _add_generate,
                        _add_study, _add_rate, _add_analyze, _add_clip):
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FangzhiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
