"""A codec plugin for tests: JPEG-LS lossless that never returns on a marked image.

A frame whose first pixel is MARKER blocks the worker forever, as a native codec stuck in a
loop would (signals do not interrupt it: it sleeps in small steps).
"""

import dataclasses
import time

from router import codecs

MARKER = 4444


def _encode(frame, image, params):  # noqa: ANN001, ANN202
    if int(frame.flat[0]) == MARKER:
        while True:
            time.sleep(0.1)
    return codecs.get("jpeg-ls-lossless").encode(frame, image, params)


codecs.register(dataclasses.replace(codecs.get("jpeg-ls-lossless"), name="jpeg-ls-hangs-on-marker",
                                    encoder=_encode))
