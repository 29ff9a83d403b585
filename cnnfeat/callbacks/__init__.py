"""Lightning callbacks: the lecture's console line and the pictures of what the network learns."""

from cnnfeat.callbacks.atlas import AtlasCallback
from cnnfeat.callbacks.attribution import AttributionCallback
from cnnfeat.callbacks.base import CallbackOptions, Pictures, VisualizationCallback
from cnnfeat.callbacks.dead_relu import DeadReluCallback
from cnnfeat.callbacks.divergence import DivergenceGuard
from cnnfeat.callbacks.epoch_summary import EpochSummary
from cnnfeat.callbacks.feature_maps import LECTURE_IMAGE_IDS, FeatureMapCallback
from cnnfeat.callbacks.featviz import FeatureVisCallback
from cnnfeat.callbacks.filters import FilterCallback
from cnnfeat.callbacks.importance import ImportanceCallback
from cnnfeat.callbacks.progress_log import ProgressLog
from cnnfeat.callbacks.relevance import RelevanceCallback
from cnnfeat.callbacks.representations import CrossModelCKACallback, RepresentationCallback
from cnnfeat.callbacks.shape_table import ShapeTableCallback
from cnnfeat.callbacks.top_patches import TopPatchesCallback
from cnnfeat.callbacks.umap_embedding import EmbeddingCallback

__all__ = [
    "LECTURE_IMAGE_IDS",
    "AtlasCallback",
    "AttributionCallback",
    "CallbackOptions",
    "CrossModelCKACallback",
    "DeadReluCallback",
    "DivergenceGuard",
    "EmbeddingCallback",
    "EpochSummary",
    "FeatureMapCallback",
    "FeatureVisCallback",
    "FilterCallback",
    "ImportanceCallback",
    "Pictures",
    "ProgressLog",
    "RelevanceCallback",
    "RepresentationCallback",
    "ShapeTableCallback",
    "TopPatchesCallback",
    "VisualizationCallback",
]
