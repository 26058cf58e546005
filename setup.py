"""simclr-tf: SimCLRv2 (Chen et al., NeurIPS 2020) in Keras 3 / TensorFlow."""

import setuptools

setuptools.setup(
    name="simclr-tf",
    version="0.2.0",
    description=("SimCLRv2 in Keras 3 / TensorFlow: contrastive pretraining, "
                 "fine-tuning and distillation with reusable SavedModels."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["simclr_tf", "simclr_tf.*",
                                               "tf_hub_export",
                                               "tf_hub_export.*"]),
    package_data={"simclr_tf.data": ["cifar10_sample/*/*/*.jpg",
                                     "cifar10_sample/README.md"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.1",
        # TF 2.21 no longer installs TensorBoard; summaries need it.
        "tensorboard>=2.21,<2.22",
        "pillow>=10",
        "numpy>=1.26",
    ],
    extras_require={
        # hub.KerasLayer is Keras 2 only: the hub tests load our exports
        # under tf-keras (TF_USE_LEGACY_KERAS=1) in a subprocess.
        # pytest 9.2 drops the xdist_group marks that `make test` shares
        # module fixtures by (pytest-xdist issue 1386).
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.8", "tensorflow-hub>=0.16",
                 "tf-keras>=2.21,<2.22"],
        "bench": ["matplotlib>=3.8"],
        # simclr_tf.deploy: LiteRT (TFLite) and ONNX files of an export, run
        # with ai-edge-litert's interpreter and onnxruntime for the check.
        "deploy": ["ai-edge-litert>=2.3,<3", "tf2onnx>=1.17,<2",
                   "onnx>=1.23,<2", "onnxruntime>=1.32,<2"],
    },
    entry_points={"console_scripts": [
        "simclr-tf=simclr_tf.cli:entry_point",
        "simclr-tf-import-official=tf_hub_export.import_official:entry_point",
    ]},
)
