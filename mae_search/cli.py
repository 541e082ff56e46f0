"""Command line: ``mae-search train | search | list | report | ui``.

Every user-facing error (bad config, missing data, corrupt checkpoint, bad
search space, unreachable MLflow) is a subclass of ValueError raised with a
one-line message; ``main`` prints it as ``error: ...`` and exits 2 instead of a
traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mae_search.config import ConfigError, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()


@app.callback()
def _root() -> None:
    """Ablations and hyperparameter searches of Masked Autoencoders on Ray, tracked in MLflow."""


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig; the tiny embedded default if omitted")] = None,
    out: Annotated[Path, typer.Option(help="directory for checkpoint, metrics and grid")] = Path("results/train"),
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    epochs: Annotated[int | None, typer.Option(help="override epochs")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set masking.mask_ratio=0.9")] = None,
) -> None:
    """Pre-train one MAE with a progress bar and per-epoch metrics (no Ray needed)."""
    from tqdm import tqdm

    from mae_search.train import Trainer

    try:
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        overrides = dict(_parse_assignment(s) for s in set_ or [])
        if epochs is not None:
            overrides["epochs"] = epochs
        if overrides:
            cfg = cfg.with_overrides(overrides, source="--set")
        trainer = Trainer(cfg)
        ckpt = out / "checkpoint.pt"
        if resume:
            trainer.resume(ckpt)
            console.print(f"resumed from {ckpt} at epoch {trainer.epoch}")
    except ValueError as exc:
        _fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    bar = tqdm(total=cfg.epochs, initial=trainer.epoch, desc="pretrain", unit="epoch")

    def on_epoch_end(epoch: int, metrics: dict[str, float], t: Trainer) -> None:
        t.save(ckpt)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.update(1)
        shown = {k: metrics[k] for k in ("loss", "mask_ratio", "linear_probe_acc", "knn_acc", "psnr") if k in metrics}
        bar.write(f"epoch {epoch}: " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    trainer.fit(on_epoch_end)
    bar.close()
    grid = trainer.save_reconstruction(out / "reconstruction.png")
    console.print(f"done: checkpoint {ckpt}, metrics {out / 'metrics.jsonl'}, grid {grid}")


def _parse_assignment(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
