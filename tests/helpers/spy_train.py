"""``launchers/train.py`` with a probe at the start of training (tests only).

When ``UnlearningTrainer.train`` is entered it writes ``$ASU_SPY_OUT/rank<R>.json``: how many
transformers models exist in the process (``gc``, :func:`model_roots`), the reference's type, and how many parameter
elements the optimizer holds vs the LoRA adapters — then the real training runs unchanged. A LoRA
export adds ``$ASU_SPY_OUT/export_rank<R>.json``: how often it loaded the base model with its adapter.
"""

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))
import _bootstrap  # noqa: E402,F401  (environment before anything imports deepspeed)

import pipeline.engine.export_peft as export_peft  # noqa: E402
import pipeline.engine.trainer as trainer_mod  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.helpers.models import model_roots  # noqa: E402

_train = trainer_mod.UnlearningTrainer.train


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def train(self):
    if "ASU_SPY_OUT" not in os.environ:
        return _train(self)
    models = model_roots()
    opt = getattr(self.engine, "optimizer", None)
    groups = getattr(opt, "fp16_groups", None) or [g["params"] for g in opt.param_groups]
    module = self.engine.module
    rec = {
        "models": models,
        "reference": type(self.reference).__name__,
        "optimizer_numel": sum(_numel(p) for g in groups for p in g),
        "lora_numel": sum(_numel(p) for n, p in module.named_parameters() if "lora_" in n),
        "trainable_non_lora": [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n],
    }
    out = Path(os.environ["ASU_SPY_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))
    return _train(self)


trainer_mod.UnlearningTrainer.train = train
_load_lora, _loads = export_peft.load_lora, []


def load_lora(*args, **kwargs):
    _loads.append(1)
    if "ASU_SPY_OUT" in os.environ:
        out = Path(os.environ["ASU_SPY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"export_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"base_loads": len(_loads)}))
    return _load_lora(*args, **kwargs)


export_peft.load_lora = load_lora
runpy.run_path(str(ROOT / "launchers" / "train.py"), run_name="__main__")
