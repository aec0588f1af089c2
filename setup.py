"""Packaging for cmb-csvd: microbleed detection (Detectron2) and CSVD classification (MIL)."""

from setuptools import setup

setup(
    name="cmb-csvd",
    version="0.1.0",
    description=(
        "Cerebral microbleed detection on SWI with Detectron2 Mask R-CNN and "
        "cerebral small vessel disease classification with multi-instance learning"
    ),
    packages=["detection", "detection.data", "detection.evaluation", "mil"],
    python_requires=">=3.10",
    install_requires=[
        # Detectron2 itself is installed by tools/install_detectron2.py (see README).
        "torch",
        "torchvision",
        "pycocotools",
        "nibabel",
        "nilearn",
        "opencv-python-headless",
        "scikit-learn",
        "pandas",
        "scipy",
        "matplotlib",
        "tqdm",
        "pyyaml",
        "numpy>=2",
        "Pillow>=10",
    ],
    extras_require={"dev": ["pytest", "ruff"]},
)
