"""A codec plugin for tests: JPEG-LS lossless that aborts the process on a marked image.

A frame whose first pixel is MARKER kills the worker with SIGABRT, as a native codec's failed
assertion would.
"""

import dataclasses
import os

from router import codecs

MARKER = 3333


def _encode(frame, image, params):  # noqa: ANN001, ANN202
    if int(frame.flat[0]) == MARKER:
        os.abort()
    return codecs.get("jpeg-ls-lossless").encode(frame, image, params)


codecs.register(dataclasses.replace(codecs.get("jpeg-ls-lossless"), name="jpeg-ls-aborts-on-marker",
                                    encoder=_encode))
