"""Which data, how it is read and augmented, and batch sizes."""

from absl import flags as absl_flags


def define(fv):
    absl_flags.DEFINE_string(
        "dataset",
        "digits",
        "digits (embedded default), synthetic, imagenet, folder, or tfds:NAME.",
        flag_values=fv,
    )
    absl_flags.DEFINE_string("data_dir", None, "Directory of the dataset files.", flag_values=fv)
    absl_flags.DEFINE_integer(
        "image_size", None, "Input size (default: the dataset's).", flag_values=fv
    )
    absl_flags.DEFINE_integer(
        "num_classes", None, "Number of classes (default: the dataset's).", flag_values=fv
    )
    absl_flags.DEFINE_integer(
        "train_examples",
        None,
        "Train on a subset of this many training examples, the same for every run: "
        "stratified by class and drawn with a fixed seed (--dataset=digits). It defines the "
        "run; train top-1 and precise BatchNorm statistics use the subset too.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "selection_examples",
        0,
        "Hold this many training examples (or this fraction, if below 1) out of training "
        "as the selection set, on which a study chooses its learning rate instead of on the "
        "test set: stratified by class, the same for every method and --seed "
        "(input_pipeline/selection.py). Training, train top-1 and precise BatchNorm "
        "statistics leave it out; the finished run is evaluated on it (summary.json "
        "selection_top1). 0: none.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "selection_seed",
        0,
        "Which part --selection_examples holds out (not --seed: every run of a study holds "
        "out the same part).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "batch_size",
        256,
        "Global training batch size: the examples of one optimizer step, over all replicas "
        "and --accumulation_steps micro-batches.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "accumulation_steps",
        1,
        "Micro-batches per optimizer step: each replica computes gradients on "
        "batch_size / (replicas x N) examples N times and the step applies their mean, so the "
        "paper's global batch runs on fewer devices. BatchNorm statistics are per micro-batch; "
        "ConAdv's --staleness counts optimizer steps.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "eval_batch_size", 512, "Global evaluation batch size.", flag_values=fv
    )
    absl_flags.DEFINE_enum(
        "augment",
        "none",
        ["none", "autoaugment", "randaugment"],
        "Extra training augmentation.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "autoaugment_policy", "v0", ["v0", "imagenet"], "AutoAugment policy.", flag_values=fv
    )
    absl_flags.DEFINE_integer("randaugment_layers", 2, "RandAugment ops per image.", flag_values=fv)
    absl_flags.DEFINE_float(
        "randaugment_magnitude", 10.0, "RandAugment magnitude (0-30).", flag_values=fv
    )
    absl_flags.DEFINE_bool(
        "one_based_labels", False, "imagenet: labels in the files are 1..1000.", flag_values=fv
    )
    absl_flags.DEFINE_bool(
        "deterministic", False, "Exactly reproducible input order (slower).", flag_values=fv
    )
    absl_flags.DEFINE_bool(
        "cache_eval", False, "Cache the decoded evaluation set in memory.", flag_values=fv
    )
    absl_flags.DEFINE_string(
        "tf_data_service",
        None,
        "Offload training preprocessing to this tf.data service dispatcher, grpc://HOST:PORT "
        "(BUILD.md: starting a dispatcher and workers).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "tf_data_service_workers",
        1,
        "--tf_data_service: 1 = exact mode, one service worker makes the seeded stream (a "
        "resumed run reads the very batches an uninterrupted one would); N > 1 = fast mode, "
        "the dispatcher's workers share each epoch (dynamic sharding: every example once per "
        "epoch, in an order that is not reproducible; a resume re-draws the current epoch's "
        "remaining examples; the dispatcher's count at start is recorded); 0 = the mode the "
        "dispatcher's worker count at start gives.",
        flag_values=fv,
    )
    absl_flags.DEFINE_bool(
        "skip_corrupt_records",
        False,
        "Skip (and count) undecodable records instead of stopping.",
        flag_values=fv,
    )
    absl_flags.DEFINE_bool(
        "tfds_download", False, "tfds:NAME: allow tensorflow-datasets to download.", flag_values=fv
    )
