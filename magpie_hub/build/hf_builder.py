"""The build through the ``datasets`` builder API.

    from magpie_hub.build.hf_builder import MagpieBuilder
    builder = MagpieBuilder(recipe="builders/demo.yaml", config_name="single_turn")
    builder.download_and_prepare()
    ds = builder.as_dataset("train")

``download_and_prepare()`` runs the same resumable build as ``magpie-hub build RECIPE --config NAME``
(:func:`magpie_hub.build.run.run_build`) into a work directory under the datasets cache (or ``build_dir``),
then reads its shards, so the rows are identical to the CLI's for the same recipe and config. The
builder's cache hash is the config's recipe fingerprint: editing the recipe gives a fresh build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from magpie_hub import pipeline
from magpie_hub.dataset.schema import BUILD_FEATURES
from magpie_hub.errors import RecipeError
from magpie_hub.layout import shard_paths
from magpie_hub.recipe.load import load_recipe

CITATION = """@article{xu2024magpie,
  title={Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing},
  author={Zhangchen Xu and Fengqing Jiang and Luyao Niu and Yuntian Deng and Radha Poovendran and Yejin Choi and Bill Yuchen Lin},
  journal={ArXiv}, year={2024}, volume={abs/2406.08464}
}"""


@dataclass
class MagpieBuilderConfig(datasets.BuilderConfig):
    """``name`` is the recipe's config; the other fields mirror ``magpie-hub build`` options."""

    recipe: str | None = None
    rows: int | None = None
    model: str | None = None
    backend: str | None = None
    endpoint: str | None = None
    build_dir: str | None = None


class MagpieBuilder(datasets.GeneratorBasedBuilder):
    """A ``GeneratorBasedBuilder`` for one config of a magpie-hub recipe."""

    BUILDER_CONFIG_CLASS = MagpieBuilderConfig
    VERSION = datasets.Version("1.0.0")

    def __init__(self, *args, recipe: str | Path | None = None, config_name: str | None = None, **kwargs):
        if recipe is None:
            raise RecipeError("MagpieBuilder needs recipe=PATH (a recipe YAML, see builders/)")
        overrides = {k: kwargs.get(k) for k in ("rows", "model", "backend", "endpoint")}
        rec = load_recipe(recipe, overrides)
        if config_name is None:
            config_name = next(iter(rec.configs))
        rec.select([config_name])            # unknown config -> RecipeError
        kwargs.setdefault("hash", rec.fingerprint(config_name)[:16])
        self._recipe = rec
        super().__init__(*args, config_name=config_name, recipe=str(Path(recipe).resolve()), **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=f"MAGPIE synthetic conversations, recipe {self._recipe.name!r}, model {self._recipe.model}",
            features=BUILD_FEATURES, citation=CITATION,   # replaced by the written schema once built
        )

    def _build_dir(self) -> Path:
        if self.config.build_dir:
            return Path(self.config.build_dir)
        return Path(self._cache_dir_root, "magpie_hub_builds",
                    f"{self._recipe.name}-{self.config.name}-{self._recipe.fingerprint(self.config.name)[:16]}")

    def _split_generators(self, dl_manager):
        out = self._build_dir()
        cfg = self.config
        pipeline.build(cfg.recipe, out=out, configs=[cfg.name], rows=cfg.rows, model=cfg.model, backend=cfg.backend,
                  endpoint=cfg.endpoint)
        files = [str(p) for p in shard_paths(out, cfg.name)]
        # the config's own columns (multi-turn instruction_k / response_k, preference, reasoning...), as written
        self.info.features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"files": files})]

    def _generate_examples(self, files: list[str]):
        key = 0
        names = list(self.info.features)
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(columns=names):
                for row in batch.to_pylist():
                    yield key, row
                    key += 1
