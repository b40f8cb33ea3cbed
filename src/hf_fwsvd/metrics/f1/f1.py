# Copyright 2025 The hf-fwsvd Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""F1 score, as a local `evaluate` metric module.

A drop-in for the Hub's ``evaluate.load("f1")`` (same inputs, keyword arguments and output key), shipped with
hf-fwsvd so it loads offline with ``evaluate.load(<path to this file>)``. The score comes from scikit-learn.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = """
The harmonic mean of precision and recall, F1 = 2 * precision * recall / (precision + recall), computed with
`sklearn.metrics.f1_score`. With the default `average="binary"` it is the F1 of the class `pos_label`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels (lists of 0/1 indicators with the `"multilabel"` config).
    references (`list[int]`): Reference labels, in the same format.
    labels (`list[int]`, *optional*): Labels to include when `average` is not `"binary"`, and their order when
        `average` is `None`. Defaults to every label seen, sorted.
    pos_label (`int`, *optional*, defaults to 1): The positive class when `average="binary"`.
    average (`str` or `None`, *optional*, defaults to `"binary"`): `"binary"`, `"micro"`, `"macro"`,
        `"weighted"`, `"samples"` (multilabel only), or `None` for one score per label.
    sample_weight (`list[float]`, *optional*): One weight per example.

Returns:
    `dict`: `{"f1": float}`, between 0 and 1, or `{"f1": numpy.ndarray}` of per-label scores if `average=None`.

Examples:
    >>> f1 = evaluate.load("path/to/metrics/f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def _features(config_name: str) -> datasets.Features:
    value = datasets.Value("int32")
    if config_name == "multilabel":
        return datasets.Features({"predictions": datasets.Sequence(value), "references": datasets.Sequence(value)})
    return datasets.Features({"predictions": value, "references": value})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label: int = 1,
        average: str | None = "binary",
        sample_weight=None,
    ) -> dict:
        score = f1_score(
            references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight
        )
        # Recent scikit-learn returns a Python float for a single score, older versions a NumPy scalar.
        score = np.asarray(score)
        return {"f1": float(score) if score.ndim == 0 else score}
