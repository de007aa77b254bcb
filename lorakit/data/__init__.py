"""Datasets: text records and batching (the embedded default is built from the installed Python
standard library), and images: readers (ImageFolder, IDX / Fashion-MNIST, YOLO layout) returning the
forms in `images.py`, transforms, and synthetic detection scenes."""
