"""metauas: MetaUAS one-prompt anomaly segmentation, from numpy.

    import metauas
    engine = metauas.Engine("metauas-256.ckpt", size=256)      # or Engine.synthetic(256)
    prompt = engine.encode_prompt("good.png")                 # array, path or bytes
    result = engine.segment(prompt, "frame.png")
    result.map, result.score                                  # float32 (256, 256), float

The maps equal the `metauas` command's bit for bit (the same Rust engine and decoders).
Errors are `metauas.Error` (a ValueError) with one line naming the problem; a missing file
is FileNotFoundError.
"""

from ._metauas import Engine, Error, Prompt, PromptBank, Result, __version__

__all__ = ["Engine", "Error", "Prompt", "PromptBank", "Result", "__version__"]
