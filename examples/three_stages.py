r"""SimCLRv2's three stages from Python, on the bundled CIFAR-10 sample.

  python examples/three_stages.py [OUT_DIR]

Uses only the public API of `simclr_tf`. It is the README's example,
verbatim (the test suite checks that it is, then runs this file), and ends
by printing one JSON line with what the suite compares against the command
line run with the same flags. Training from NumPy arrays or a
`tf.data.Dataset` instead of a named dataset: docs/api.md.
"""

import json
import os
import sys

import numpy as np

out = sys.argv[1] if len(sys.argv) > 1 else "example_runs"
os.makedirs(out, exist_ok=True)
os.chdir(out)

# --- README example (begin) ---
import simclr_tf

# 1. Pretrain: contrastive learning on unlabeled images (the bundled sample).
pre = simclr_tf.pretrain("cifar10_sample", model_dir="runs/pretrain",
                         width_multiplier=0.25, train_steps=10,
                         train_batch_size=64, seed=0)
# 2. Fine-tune on 10% of the labels, from the projection head's middle layer.
ft = simclr_tf.finetune("cifar10_sample", init_from=pre.export_path,
                        model_dir="runs/finetune", label_fraction=0.1,
                        train_steps=10, train_batch_size=25, seed=0)
print("fine-tuned top-1:", ft.metrics["top1"])
# 3. Distill into a half-width student on the unlabeled images.
student = simclr_tf.distill("cifar10_sample", teacher=ft.export_path,
                            model_dir="runs/distill", width_multiplier=0.125,
                            train_steps=10, train_batch_size=64, seed=0)
print("student:", simclr_tf.evaluate(student.export_path, "cifar10_sample"))
# Any export is a trainable Keras model with named outputs.
model = simclr_tf.load_export(student.export_path)
features = simclr_tf.embed(pre.export_path, "cifar10_sample")  # [N, 128]
# --- README example (end) ---

print(json.dumps({
    "finetune_top1": ft.metrics["top1"],
    "finetune_export": os.path.abspath(ft.export_path),
    "student_outputs": sorted(model(np.zeros([1, 32, 32, 3], np.float32))),
    "embed_shape": list(features.shape),
}))
