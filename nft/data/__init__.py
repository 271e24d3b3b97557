from .core import CleanSet, DatasetSplits, ImageData, holdout_split, stratified_pick, to_float, to_uint8
from .registry import load_dataset

__all__ = ["CleanSet", "DatasetSplits", "ImageData", "holdout_split", "stratified_pick", "to_float", "to_uint8",
           "load_dataset"]
