"""Fine-tuning budget on the embedded set: at which epochs and learning rate does fine-tuning a tiny MAE
score at least its linear probe (as in the paper), and how does training from scratch fare on the
same budget?

Pre-trains the tiny mask-ratio ablation's 0.75 trial (seed 0) once, then fine-tunes its encoder on the
project's recipe, and a random initialisation on the from-scratch recipe (no layer decay, weight decay
0.3), under each budget; top-1 on the validation and the test split. About 10 minutes on 2 cores.

    python -m benchmarks.finetune_budget
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import machine, write_section
from mae_search.mae.model import MaskedAutoencoderViT, encoder_state_dict
from mae_search.search.space import load_search_space
from mae_search.training.finetune import finetune
from mae_search.training.train import Trainer

BUDGETS = (
    ("12 epochs, blr 2e-3 (the recipe's default lr)", {"epochs": 12, "blr": 2e-3}),
    ("12 epochs, blr 4e-3", {"epochs": 12, "blr": 4e-3}),
    ("30 epochs, blr 2e-3", {"epochs": 30, "blr": 2e-3}),
    ("30 epochs, blr 4e-3 (the tiny spaces)", {"epochs": 30, "blr": 4e-3}),
    ("30 epochs, blr 4e-3, layer decay 0.9", {"epochs": 30, "blr": 4e-3, "layer_decay": 0.9}),
)


def main() -> None:
    space = load_search_space("search_spaces/mask_ratio_tiny.yaml")
    cfg = space.trial_config({"masking.mask_ratio": 0.75}, seed=0).with_overrides({"eval.finetune.at": "never"})
    trainer = Trainer(cfg)
    trainer.fit()
    probe = trainer.history[-1]
    trained = encoder_state_dict(trainer.model)
    torch.manual_seed(cfg.seed)  # the random init a trial of this seed starts from
    scratch = encoder_state_dict(MaskedAutoencoderViT(cfg.model))
    targets = {"val": trainer.data.val, "test": trainer.data.test}
    cpu = torch.device("cpu")
    lines = [f"Machine: {machine()}. Encoder: mask_ratio_tiny, ratio 0.75, seed 0; linear probe "
             f"{100 * probe['linear_probe_acc']:.1f} % test ({100 * probe['val_linear_probe_acc']:.1f} % val), "
             f"{len(trainer.data.train):,} labelled training images.", "",
             "| fine-tuning budget | MAE FT test / val (%) | from scratch test / val (%) | FT - LP (test) |",
             "|---|---|---|---|"]
    for label, update in BUDGETS:
        recipe = cfg.eval.finetune.model_copy(update=update)
        start = time.perf_counter()
        mae = finetune(trained, cfg.model, trainer.data.train, targets, recipe, device=cpu, seed=0).accuracies
        base = finetune(scratch, cfg.model, trainer.data.train, targets, cfg.eval.scratch.recipe(recipe),
                        device=cpu, seed=0).accuracies
        lines.append(f"| {label} | {100 * mae['test']:.1f} / {100 * mae['val']:.1f} | {100 * base['test']:.1f} / "
                     f"{100 * base['val']:.1f} | {100 * (mae['test'] - probe['linear_probe_acc']):+.1f} |")
        print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    write_section("finetune-budget", "## Fine-tuning budget on the embedded set\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
