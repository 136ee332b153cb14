"""``--dataset`` names to data sources.

Sources are imported lazily so that, for example, tensorflow-datasets is
needed only by users of ``tfds:NAME``.
"""

from __future__ import annotations

import importlib

from input_pipeline.base import DataError, DataSource, PipelineOptions

# name -> (module, class name). ``tfds:NAME`` is handled separately.
_SOURCES = {
    "digits": ("input_pipeline.digits", "DigitsSource"),
    "synthetic": ("input_pipeline.synthetic", "SyntheticSource"),
    "imagenet": ("input_pipeline.imagenet", "ImageNetSource"),
    "folder": ("input_pipeline.imagenet", "FolderSource"),
}

#: Sources that read files from ``--data_dir``.
NEEDS_DATA_DIR = ("imagenet", "folder")


def reads_records(name: str) -> bool:
    """Whether ``--dataset=name`` reads encoded-image records (what --tf_data_service moves)."""
    return name.startswith("tfds:") or name in NEEDS_DATA_DIR


def dataset_names() -> list[str]:
    return sorted(_SOURCES) + ["tfds:NAME"]


def check_dataset_name(name: str):
    """Raises ``DataError`` unless ``--dataset=name`` names a source (imports nothing)."""
    if not (name.startswith("tfds:") and len(name) > 5) and name not in _SOURCES:
        raise DataError(
            f"--dataset={name!r} is unknown; choose one of {', '.join(dataset_names())}"
        )


def source_class(name: str) -> type[DataSource]:
    if name.startswith("tfds:"):
        module, cls = "input_pipeline.tfds_source", "TFDSSource"
    elif name in _SOURCES:
        module, cls = _SOURCES[name]
    else:
        raise DataError(
            f"--dataset={name!r} is unknown; choose one of {', '.join(dataset_names())}"
        )
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as error:
        raise DataError(
            f"--dataset={name} is not available in this version ({error}); "
            f"use one of {', '.join(sorted(_SOURCES))}"
        ) from None


def get_source(
    name: str,
    *,
    image_size: int | None = None,
    data_dir: str | None = None,
    num_classes: int | None = None,
    options: PipelineOptions | None = None,
    **kwargs,
) -> DataSource:
    """Builds the source for ``--dataset=name``.

    ``image_size=None`` takes the source's ``default_image_size``;
    ``num_classes=None`` its own class count. Extra keyword arguments go to
    the source (for example ``one_based_labels`` for ``imagenet``).
    """
    cls = source_class(name)
    if name in NEEDS_DATA_DIR and not data_dir:
        raise DataError(f"--dataset={name} reads files: set --data_dir to their directory")
    return cls.create(
        name=name,
        image_size=image_size,
        data_dir=data_dir,
        num_classes=num_classes,
        options=options or PipelineOptions(),
        **kwargs,
    )
