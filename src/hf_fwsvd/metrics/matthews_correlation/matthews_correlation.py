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
"""Matthews correlation coefficient, as a local `evaluate` metric module.

A drop-in for the Hub's ``evaluate.load("matthews_correlation")`` (same inputs and output key; the metric used for
GLUE CoLA), shipped with hf-fwsvd so it loads offline with ``evaluate.load(<path to this file>)``. The score comes
from scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = """
The Matthews correlation coefficient (MCC) between predicted and reference labels, computed with
`sklearn.metrics.matthews_corrcoef`: +1 for perfect predictions, 0 for chance level, -1 for total disagreement.
Unlike accuracy it stays informative when the classes are imbalanced.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels.
    references (`list[int]`): Reference labels.
    sample_weight (`list[float]`, *optional*): One weight per example.

Returns:
    `dict`: `{"matthews_correlation": float}`, between -1 and 1.

Examples:
    >>> mcc = evaluate.load("path/to/metrics/matthews_correlation")
    >>> mcc.compute(predictions=[0, 1, 1, 0], references=[0, 1, 1, 0])
    {'matthews_correlation': 1.0}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"
            ],
        )

    def _compute(self, predictions, references, sample_weight=None) -> dict:
        score = matthews_corrcoef(references, predictions, sample_weight=sample_weight)
        return {"matthews_correlation": float(score)}
