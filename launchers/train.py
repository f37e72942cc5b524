"""Train (unlearn) with a composed Hydra config.

    python launchers/train.py                                  # embedded tiny default, 1 process
    deepspeed --num_gpus 2 launchers/train.py +exp=tofu_tiny   # 2 ranks, ZeRO-3
    python launchers/train.py -m +exp=tofu_7b method.tau=1.5,2.0,2.5 hydra/launcher=slurm
"""

import _bootstrap  # noqa: F401  (must run first: environment + argv)
import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=_bootstrap.CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from pipeline.run import train_job

    _bootstrap.run_main(lambda: train_job(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    _bootstrap.launch(main)
