"""Type stubs of the metauas extension module."""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

ImageLike = Union[npt.NDArray[np.uint8], str, os.PathLike, bytes]
"""A uint8 (H, W, 3) RGB or (H, W) gray array, a path, or the bytes of an encoded image."""

__version__: str

class Error(ValueError):
    """A metauas error: one line naming the file or field and the problem."""

class Prompt:
    """A normal image encoded by an engine."""

    @property
    def size(self) -> int: ...

class Result:
    """One query's outcome."""

    @property
    def map(self) -> npt.NDArray[np.float32]:
        """The anomaly map, float32 (S, S), zero outside an inspection mask."""
    @property
    def score(self) -> float:
        """The map's maximum."""
    @property
    def anomalous(self) -> Optional[bool]:
        """score >= the image threshold, or None without a calibrated bank."""
    @property
    def verdict(self) -> Optional[Dict[str, Any]]:
        """anomalous, score, image_threshold, pixel_threshold (each {value, source})."""
    @property
    def regions(self) -> List[Dict[str, Any]]:
        """Defect regions: box (frame pixels), map_box, area_px, area_fraction, max, mean, centroid."""
    @property
    def frame(self) -> Tuple[int, int]:
        """The query's (width, height)."""
    def map_at(self, width: Optional[int] = None, height: Optional[int] = None) -> npt.NDArray[np.float32]:
        """The map resized (OpenCV INTER_LINEAR) to width x height, by default the query's size."""

class Engine:
    """MetaUAS on one backend at one size; thread-safe; releases the GIL while it runs."""

    def __init__(
        self,
        weights: Union[str, os.PathLike],
        size: int = 256,
        backend: str = "auto",
        precision: str = "f32",
    ) -> None: ...
    @staticmethod
    def synthetic(
        size: int = 256,
        seed: int = 1,
        backend: str = "cpu",
        gain_encoder: float = 1.0,
        gain_alignment: float = 1.0,
        gain_decoder: float = 1.0,
        gain_head: float = 1.0,
    ) -> "Engine":
        """Deterministic synthetic weights (docs/SYNTHETIC.md): to try the API; maps mean nothing."""
    @property
    def backend(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def weights_hash(self) -> str: ...
    def encode_prompt(self, image: ImageLike) -> Prompt: ...
    def segment(
        self, prompt: Union[Prompt, "PromptBank"], query: ImageLike, multi: Optional[str] = None
    ) -> Result: ...
    def segment_batch(self, prompt: Prompt, queries: Sequence[ImageLike]) -> List[Result]: ...
    def segment_pair(self, prompt_image: ImageLike, query_image: ImageLike) -> Tuple[Prompt, Result]: ...
    def segment_with_taps(
        self, prompt_image: ImageLike, query_image: ImageLike
    ) -> Dict[str, npt.NDArray[np.float32]]:
        """Every intermediate tensor (float32, NCHW), named as `metauas segment --taps` names them."""

class PromptBank:
    """Encoded normal images with an optional inspection mask and calibration."""

    @staticmethod
    def build(
        engine: Engine,
        images: Sequence[ImageLike],
        names: Optional[Sequence[str]] = None,
        roi: Optional[ImageLike] = None,
    ) -> "PromptBank": ...
    @staticmethod
    def load(path: Union[str, os.PathLike], engine: Optional[Engine] = None) -> "PromptBank": ...
    def save(self, path: Union[str, os.PathLike]) -> None: ...
    def calibrate(
        self,
        engine: Engine,
        images: Sequence[ImageLike],
        method: str = "max",
        margin: float = 0.05,
        pixel_method: str = "quantile:0.999",
        multi: str = "best",
    ) -> Dict[str, Any]: ...
    @property
    def names(self) -> List[str]: ...
    @property
    def size(self) -> int: ...
    @property
    def weights_hash(self) -> str: ...
    @property
    def calibration(self) -> Optional[Dict[str, Any]]: ...
    def __len__(self) -> int: ...
