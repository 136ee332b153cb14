"""What to run, where to write it, and on which devices."""

from absl import flags as absl_flags

from flags import method


def define(fv):
    absl_flags.DEFINE_enum(
        "mode",
        "train_and_eval",
        ["train", "eval", "train_and_eval", "export", "sharpness", "dry_run"],
        "train: train only; eval: evaluate the latest checkpoint; "
        "train_and_eval: train with periodic evaluation; export: write the latest "
        "checkpoint's model.keras and serving SavedModel (also done after training); "
        "sharpness: measure the latest checkpoint's top Hessian eigenvalue and ε-sharpness "
        "into sharpness.json (--sharpness_*); eval, export and sharpness on an existing "
        "--model_dir take every flag not given from its run_config.json; "
        "dry_run: print the configuration the flags give (batches per replica and BatchNorm "
        "group, steps, learning rates, ring-buffer bytes, parameters) without reading data.",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "model_dir",
        None,
        "Checkpoints, TensorBoard logs, summary.json, log.txt and the export. A run on a "
        "directory with a checkpoint resumes from it; run_config.json records the flags that "
        "define the run, and a start with other values of those stops with an error. These may "
        "change on resume: --train_steps, --train_epochs (upward to train longer; a new length "
        "re-plans the poly or cosine decay from the checkpoint's step, said in one note: line "
        "and recorded in run_config.json), "
        "--steps_per_loop, --epochs_between_evals, --checkpoint_steps, --mode, "
        "--eval_batch_size, --eval_attack_*, --eval_predictions, --precise_bn_batches, "
        "--data_dir, --export_dir, "
        "--cache_eval, --skip_corrupt_records, --tf_data_service, --tf_data_service_workers, "
        "--distribution_strategy, "
        "--num_cpu_devices, --num_replicas, --tpu, --all_reduce_alg, --peer_timeout, "
        "--cluster_start_timeout, --jit_compile, --update_pass, "
        "--mlperf_log, --mlperf_org, --mlperf_division, --mlperf_platform, --target_accuracy, "
        "--sharpness_examples, --sharpness_iterations, --sharpness_tolerance, --sharpness_eps, "
        "--sharpness_steps, --verbosity. "
        "Default: <tmp>/conadv/<dataset>_<model>_<method>_<hash of the defining flags>.",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "export_dir",
        None,
        "Where the inference model is saved (default <model_dir>/export).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "train_steps",
        None,
        "Total training steps; overrides --train_epochs. The learning-rate decay is planned "
        "over them (a resume with another value re-plans it; see --model_dir).",
        flag_values=fv,
    )
    absl_flags.DEFINE_float("train_epochs", 16.0, "Training length in epochs.", flag_values=fv)
    absl_flags.DEFINE_integer(
        "steps_per_loop", 10, "Steps run inside one compiled host call.", flag_values=fv
    )
    absl_flags.DEFINE_float(
        "epochs_between_evals",
        8.0,
        "Evaluate (and checkpoint) every this many epochs, and at the end.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "checkpoint_steps",
        0,
        "Also checkpoint every this many steps (0: only at evaluations and at the end).",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "distribution_strategy",
        "default",
        ["default", "one_device", "mirrored", "multi_worker_mirrored", "tpu"],
        "default: one device, or all local devices when there are several; mirrored: "
        "every local GPU (or logical CPU); multi_worker_mirrored: every GPU (or the CPU) of "
        "every worker of the cluster in TF_CONFIG; tpu: the Cloud TPU named by --tpu.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "num_replicas",
        None,
        "The replica count this configuration is made for (TPU cores of the slice, workers x "
        "GPUs of a cluster). A run stops if its strategy has another count; --mode=dry_run "
        "uses it instead of connecting to the TPU or cluster.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "all_reduce_alg",
        "auto",
        ["auto", "ring", "nccl"],
        "multi_worker_mirrored: the collective all-reduce (nccl needs GPUs; auto lets "
        "TensorFlow choose).",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "peer_timeout",
        30.0,
        "multi_worker_mirrored: seconds without a worker's heartbeat before TensorFlow's "
        "coordination service declares it lost; every other worker then stops with one line "
        "(exit 4, BUILD.md). A killed worker is noticed at the next collective, sooner. "
        "--tf_data_service: seconds its dispatcher may leave a question unanswered (exit 5).",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "cluster_start_timeout",
        300.0,
        "multi_worker_mirrored: seconds every worker waits for all of TF_CONFIG's tasks to "
        "start; then the run stops with one line naming the missing ones (exit 4).",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "tpu",
        "local",
        "--distribution_strategy=tpu: a Cloud TPU name, a grpc://HOST:PORT address, "
        "or local (the TPU of this TPU VM).",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "precision",
        "float32",
        ["float32", "mixed_bfloat16", "mixed_float16"],
        "Compute dtype (Keras mixed-precision policy). Variables, BatchNorm, LARS, the loss "
        "and the attack's projection stay float32. mixed_bfloat16 for TPU, mixed_float16 "
        "(with loss scaling) for GPU.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "update_pass",
        "auto",
        ["auto", *method.UPDATE_PASSES],
        "The adversarial update: one pass over [clean; adversarial] (2B rows, split "
        "BatchNorm in mixed mode) or two passes of B rows. auto: concatenated on TPU and "
        "GPU, separate on CPU (faster there, see README).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "num_cpu_devices",
        1,
        "Split the CPU into this many logical devices (to run multi-replica code on one CPU).",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "jit_compile",
        "auto",
        ["auto", "true", "false"],
        "Compile the step with XLA. auto: on TPU only (XLA is slower on CPU).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "seed", 0, "Seed for weights, data order and attacks.", flag_values=fv
    )
    absl_flags.DEFINE_string(
        "mlperf_log",
        None,
        "Also write the MLPerf training log (ResNet events and hyperparameters, "
        "mlperf-logging format) to this file; needs pip install conadv[mlperf].",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "mlperf_org", "conadv", "--mlperf_log: the submission_org value.", flag_values=fv
    )
    absl_flags.DEFINE_enum(
        "mlperf_division",
        "auto",
        ["auto", "closed", "open"],
        "--mlperf_log: the submission_division value. auto: closed for --method=vanilla, "
        "open for the adversarial methods (they change the reference training).",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "mlperf_platform",
        None,
        "--mlperf_log: the submission_platform value (default: the replica count and device "
        "kind, e.g. 8xGPU).",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "target_accuracy",
        0.759,
        "Top-1 accuracy (a fraction) whose first reaching is timed in summary.json and "
        "ends the MLPerf run successfully (MLPerf ResNet: 0.759).",
        flag_values=fv,
    )
