r"""SimCLRv2's three stages from Python, on the bundled CIFAR-10 sample.

  python examples/three_stages.py [OUT_DIR]

Uses only the public API of `simclr_tf`. The first part is the README's
example, verbatim (the test suite checks that it is, then runs this file);
the second trains from NumPy arrays. It ends by printing one JSON line with
what the suite compares against the command line run with the same flags.
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

# The same stages from in-memory images: NumPy arrays with labels.
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8)
labels = np.arange(96) % 4
pre_np = simclr_tf.pretrain(images, labels, model_dir="runs/pretrain_numpy",
                            width_multiplier=0.125, train_steps=3,
                            train_batch_size=32, seed=0)
ft_np = simclr_tf.finetune(images, labels, init_from=pre_np.export_path,
                           model_dir="runs/finetune_numpy",
                           eval_data=images[:32], eval_labels=labels[:32],
                           train_steps=3, train_batch_size=32, seed=0)
probabilities = simclr_tf.predict(ft_np.export_path, images[:8])

print(json.dumps({
    "finetune_top1": ft.metrics["top1"],
    "finetune_export": os.path.abspath(ft.export_path),
    "student_outputs": sorted(model(images[:1] / 255.0)),
    "embed_shape": list(features.shape),
    "numpy_finetune_top1": ft_np.metrics["top1"],
    "numpy_predict_shape": list(probabilities.shape),
}))
