"""A codec plugin for tests: JPEG-LS lossless that takes SECONDS for every frame, as a large
image does: a pool kept busy by it is working, not stalled."""

import dataclasses
import time

from router import codecs

SECONDS = 1.0


def _encode(frame, image, params):  # noqa: ANN001, ANN202
    time.sleep(SECONDS)
    return codecs.get("jpeg-ls-lossless").encode(frame, image, params)


codecs.register(dataclasses.replace(codecs.get("jpeg-ls-lossless"), name="jpeg-ls-slow", encoder=_encode))
