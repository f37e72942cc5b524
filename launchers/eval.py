"""Evaluate a model without training it (the target or retain model, or an exported run).

    python launchers/eval.py +exp=tofu_tiny model.variant=target run_name=tofu_tiny/target
    python launchers/eval.py +exp=tofu_tiny model.source=pretrained model.path=runs/tofu_tiny/asu_kl/model \
        run_name=tofu_tiny/asu_eval
"""

import _bootstrap  # noqa: F401
import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=_bootstrap.CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from pipeline.eval.runner import eval_job

    _bootstrap.run_main(lambda: eval_job(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    _bootstrap.launch(main)
