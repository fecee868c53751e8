"""Feature extraction at dataset scale: ``extract`` / ``Extractor`` write pooled embeddings (and patch-feature maps)
as ``.npy`` shards with parquet metadata (clip-retrieval's layout); ``load_features``, ``iter_features`` and
``FeatureStore`` read them back. Command line: ``vim-extract-features`` (``vim.features.cli``)."""
from .extractor import DTYPES, Extractor, extract
from .layout import FeatureError
from .reader import FeatureStore, Shard, iter_features, load_features

__all__ = ['DTYPES', 'Extractor', 'FeatureError', 'FeatureStore', 'Shard', 'extract', 'iter_features',
           'load_features']
