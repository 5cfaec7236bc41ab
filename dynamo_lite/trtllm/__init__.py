"""``python -m dynamo_lite.trtllm``: the worker with the TensorRT-LLM engine, as Dynamo's ``dynamo.trtllm``."""
