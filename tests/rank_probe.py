"""Run train.py's trainer under torchrun and record, per rank, the blocks it read and a hash of its weights."""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcompress.data import BlockDataset  # noqa: E402
from lmcompress.training import build_trainer  # noqa: E402

seen = []
read_block = BlockDataset.__getitem__


def recording_read(self, index):
    seen.append(int(index))
    return read_block(self, index)


BlockDataset.__getitem__ = recording_read
trainer, _ = build_trainer(sys.argv[1:])
trainer.train()
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
record = {"blocks": seen, "weights": weights, "n_blocks": len(trainer.train_dataset)}
Path(trainer.args.output_dir, f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))
