"""STAND-IN (tests only): ``tensorrt_llm.executor``, only the log-probability types of its ``result`` module."""
