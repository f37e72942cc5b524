"""Continual unlearning: forget requests applied one after another, evaluated after each.

    python launchers/continual.py +exp=tofu_tiny 'continual.requests=[forget10_part1,forget10_part2]'
    deepspeed --num_gpus 2 launchers/continual.py +exp=tofu_tiny 'continual.requests=[forget10_part1,forget10_part2]'

Writes ``<output_dir>/<run_name>/{continual.json,continual.md,continual_summary.json}`` and one run
directory per request (``r1_<split>/``, ``r2_<split>/``, ...); the sequence's summary table goes to stdout. ``run_name`` defaults to ``${exp_name}/continual_${method.name}``.
``trainer.dry_run=true`` prints the requests' plan and request 1's dry run and writes nothing;
``trainer.resume`` is ``auto`` or ``never`` (each request resumes from its own checkpoints).
"""

import sys

import _bootstrap  # noqa: F401  (must run first: environment + argv)
import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs
from pipeline.continual import default_run_name

register_configs()
sys.argv = default_run_name(sys.argv)


@hydra.main(version_base="1.3", config_path=_bootstrap.CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from pipeline.continual import continual_job

    _bootstrap.run_main(lambda: continual_job(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    _bootstrap.launch(main)
