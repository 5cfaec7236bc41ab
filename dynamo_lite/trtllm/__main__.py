"""``python -m dynamo_lite.trtllm [worker flags]``: ``python -m dynamo_lite.worker --engine trtllm``.

The seed's ``python3 -m dynamo.trtllm ...`` command lines work with ``dynamo.`` replaced by ``dynamo_lite.``.
"""

import sys

from dynamo_lite.worker.__main__ import main

if __name__ == "__main__":
    sys.exit(main(engine_default="trtllm", prog="python -m dynamo_lite.trtllm"))
