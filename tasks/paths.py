"""The artifact layout that dvc.yaml declares; stages read and write only these paths."""
from pathlib import Path

PREPARED = Path("data/prepared")
# The source's fingerprint (the fingerprint stage's output, ingest's dependency) and the file hashes it keeps
# between runs (git-ignored, not an output: DVC would delete it before each run).
SOURCE_FINGERPRINT = Path("data/source.json")
SOURCE_HASH_CACHE = Path("data/.source-hashes.sqlite")
PSEUDO_LABELS = Path("artifacts/pseudo_labels")
PSEUDO_TARGETS = PSEUDO_LABELS / "targets.npz"
PSEUDO_PREVIEW = PSEUDO_LABELS / "preview.png"
PRETRAIN = Path("artifacts/pretrain")
ENCODER = PRETRAIN / "encoder.pt"
ENCODER_INFO = PRETRAIN / "encoder.json"
PRETRAIN_HISTORY = PRETRAIN / "history.csv"
# Resumable state of an unfinished pretraining: not a DVC output (DVC would delete it before a rerun);
# git-ignored, and removed once the stage's outputs are written.
PRETRAIN_CHECKPOINT = Path("artifacts/checkpoints/pretrain.pt")
FINETUNE = Path("artifacts/finetune")
SSL_CLASSIFIER = FINETUNE / "ssl_classifier.pt"
BASELINE_CLASSIFIER = FINETUNE / "baseline_classifier.pt"
CLASSIFIER_INFO = FINETUNE / "classifiers.json"
FINETUNE_HISTORY = {"ssl": FINETUNE / "history_ssl.csv", "baseline": FINETUNE / "history_baseline.csv"}
SELF_TRAIN = Path("artifacts/self_train")
# The model that is registered, evaluated as the final row and predicted with: the self-trained student,
# or the fine-tuned SSL classifier when self_train.method is none.
FINAL_CLASSIFIER = SELF_TRAIN / "classifier.pt"
FINAL_INFO = SELF_TRAIN / "final.json"
POOL_PSEUDO_LABELS = SELF_TRAIN / "pseudo_labels.csv"
POOL_PSEUDO_PREVIEW = SELF_TRAIN / "pseudo_labels.png"
SELF_TRAIN_HISTORY = SELF_TRAIN / "history.csv"
RESULTS = Path("results")
METRICS = RESULTS / "metrics.json"
PER_CLASS = RESULTS / "per_class.csv"
PER_CLASS_PNG = RESULTS / "per_class.png"
PREDICTIONS = RESULTS / "predictions.csv"
CONFUSION_SSL = RESULTS / "confusion_ssl.png"
CONFUSION_BASELINE = RESULTS / "confusion_baseline.png"
# The registered model's: the self-trained student, or the SSL fine-tune when self_train.method is none.
CONFUSION_FINAL = RESULTS / "confusion_final.png"
# What the flow's parent run carries of the evaluation (the stage run carries every results file).
RESULT_FILES = (METRICS, PER_CLASS, PER_CLASS_PNG, CONFUSION_FINAL)
