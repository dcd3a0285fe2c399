"""`slora-plugin` console script: `doctor`, the `adapters` and `bench` command groups, and `train`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from typing import Any, Callable

#: Modules that contribute a sub-command through `add_subparser(subparsers)`.
SUBCOMMAND_MODULES = ("slora_plugin.adapters.cli", "slora_plugin.bench.cli", "slora_plugin.train.cli")


def doctor_report(additional_config: dict[str, Any] | None,
                  model: str | None = None) -> tuple[list[tuple[str, str]], bool]:
    """(rows of (check, result), healthy). Never raises: every failure becomes a row.

    `model` (a model directory, its config.json, or a name `bench plan` knows) lets the report
    show which modules get LoRA layers when they are derived from the adapters."""
    rows: list[tuple[str, str]] = []
    ok = True
    for pkg in ("vllm", "torch", "triton"):
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "NOT INSTALLED"))
            ok = False
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except Exception as e:  # noqa: BLE001 - report, don't crash
        gpu = f"unknown ({e})"
    rows.append(("GPU", gpu))
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    registered = any(ep.value == "slora_plugin:register" for ep in eps)
    rows.append(("plugin registered (vllm.general_plugins)", "yes" if registered else "NO"))
    ok &= registered
    try:
        from slora_plugin.patches import catalogue, guard

        found = guard.problems(catalogue.patch_modules())
        version = guard.installed_vllm_version()
        if version != guard.SUPPORTED_VLLM:
            found.insert(0, f"vLLM {version} installed, {guard.SUPPORTED_VLLM} supported")
        rows.append(("version guard", "ok" if not found else "FAILED: " + "; ".join(found)))
        ok &= not found
    except Exception as e:  # noqa: BLE001
        rows.append(("version guard", f"FAILED: {e}"))
        ok = False
    try:
        from slora_plugin.config import load_config

        cfg = load_config(additional_config)
        rows.append(("plugin switch", "on" if cfg else "off (vLLM runs as stock)"))
        if cfg:
            rows.append(("effective config", json.dumps(cfg.to_dict(), sort_keys=True)))
    except ValueError as e:
        rows.append(("plugin switch", f"INVALID: {e}"))
        return rows, False
    if cfg:
        try:
            rows.append(("LoRA layers", _lora_layers(cfg, model)))
        except ValueError as e:
            rows.append(("LoRA layers", f"INVALID: {e}"))
            ok = False
    return rows, ok


def _lora_layers(cfg: Any, model: str | None) -> str:
    """The modules the engine would wrap (raises ValueError on a bad setting or model)."""
    from slora_plugin.adapters.targets import choose_target_modules
    from slora_plugin.model_config import load_model_dims

    if model is None and cfg.target_modules is None and cfg.adapter_dir:
        return (f"the modules the adapters in {cfg.adapter_dir} target, chosen at engine start "
                f"(pass --model to see them now)")
    dims = load_model_dims(model) if model else None
    choice = choose_target_modules(cfg, dims)
    return f"{', '.join(choice.wrapped)} ({choice.reason})"


def _doctor_inputs(text: str | None) -> dict[str, Any] | None:
    """The `--additional-config` object, after checking that it and `VLLM_SLORA_CONFIG` (when it
    is the one read) parse: a broken JSON text raises MalformedConfigError, one line naming its
    source and position, since nothing else the report could say about it would help."""
    from slora_plugin.config import MalformedConfigError, parse_json_object, raw_settings

    extra = parse_json_object(text, "--additional-config") if text else None
    try:
        raw_settings(extra)
    except MalformedConfigError:
        raise
    except ValueError:
        pass  # a bad setting inside valid JSON: the report's "plugin switch" row names it
    return extra


def _doctor(args: argparse.Namespace) -> int:
    from slora_plugin.config import MalformedConfigError, unwrapped_keys_warning

    try:
        extra = _doctor_inputs(args.additional_config)
    except MalformedConfigError as e:
        print(f"slora-plugin doctor: {e}", file=sys.stderr)
        return 2
    warning = unwrapped_keys_warning(extra)
    if warning:
        print(f"slora-plugin doctor: warning: {warning}", file=sys.stderr)
    rows, ok = doctor_report(extra, args.model)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="versions, GPU, registration, guard, effective config")
    doctor.add_argument("--additional-config", help="JSON as given to vLLM's --additional-config")
    doctor.add_argument("--model", help="model directory or config.json: also show which modules "
                                        "get LoRA layers when derived from the adapters")
    doctor.set_defaults(func=_doctor)
    for name in SUBCOMMAND_MODULES:
        add: Callable[[Any], None] = importlib.import_module(name).add_subparser
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
