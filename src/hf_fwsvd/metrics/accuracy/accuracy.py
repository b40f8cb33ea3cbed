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
"""Accuracy, as a local `evaluate` metric module.

A drop-in for the Hub's ``evaluate.load("accuracy")`` (same inputs, keyword arguments and output key), shipped with
hf-fwsvd so it loads offline with ``evaluate.load(<path to this file>)``. The score comes from scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
The fraction of predictions equal to the reference label: (TP + TN) / (TP + TN + FP + FN) for two classes.
Computed with `sklearn.metrics.accuracy_score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels (lists of 0/1 indicators with the `"multilabel"` config).
    references (`list[int]`): Reference labels, in the same format.
    normalize (`bool`, *optional*, defaults to `True`): Return the fraction of correct predictions; with `False`,
        their (weighted) count.
    sample_weight (`list[float]`, *optional*): One weight per example.

Returns:
    `dict`: `{"accuracy": float}`, between 0 and 1 (or between 0 and the number of examples if `normalize=False`).

Examples:
    >>> accuracy = evaluate.load("path/to/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
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
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
