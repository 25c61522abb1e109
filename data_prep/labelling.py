"""Weak 68-point labels for images without landmarks (the logic of data_prep.label_landmarks,
which holds only the flags; see its docstring for the files written)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dff3d import detect
from dff3d import io as dio
from dff3d.datasets import celeba


@dataclasses.dataclass
class LabelReport:
  labelled: int = 0
  failed: int = 0
  multiple_faces: int = 0
  already_done: int = 0
  failures: list = dataclasses.field(default_factory=list)  # (name, reason)


def label_folder(images_dir, output_dir=None, upsample: int = 1, min_score: float = 0.0,
                 limit: int = 0, log=print) -> LabelReport:
  """Labels every image of images_dir not yet in the output files; see the module docstring.

  Returns:
    LabelReport with counts and the (name, reason) of this run's failures.
  Raises:
    FileNotFoundError: images_dir is not a directory. detect.DetectorUnavailableError: no dlib.
  """
  images_dir = Path(images_dir)
  if not images_dir.is_dir():
    raise FileNotFoundError(f"{images_dir}: no such directory (expected images to label)")
  detect.require_detector()  # fail before touching the output files if dlib is missing
  output_dir = images_dir.parent if output_dir is None else Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  lm_path = output_dir / celeba.LANDMARKS_FILE
  fail_path = output_dir / celeba.FAILURES_FILE
  done = set(celeba.read_landmarks_file(lm_path)) if lm_path.is_file() else set()
  done |= set(celeba.read_failures_file(fail_path))
  names = sorted(n for n in os.listdir(images_dir)
                 if n.lower().endswith(dio.IMAGE_EXTENSIONS) and (images_dir / n).is_file())
  report = LabelReport()
  with celeba.open_for_append(lm_path, celeba.LANDMARKS_HEADER) as lm_file, \
       celeba.open_for_append(fail_path, celeba.FAILURES_HEADER) as fail_file:
    for name in names:
      if name in done:
        report.already_done += 1
        continue
      if limit and report.labelled + report.failed >= limit:
        break
      try:
        image = dio.read_image(images_dir / name)
        faces = detect.detect_faces(image, upsample=upsample, min_score=min_score)
        reason = None if faces else "no face found"
      except dio.ImageFileError as e:
        faces, reason = [], "unreadable image: " + str(e).split(": ", 1)[-1]
      if reason is not None:
        report.failed += 1
        report.failures.append((name, reason))
        fail_file.write(f"{name} {reason}\n")
        fail_file.flush()
        log(f"{images_dir / name}: {reason}; skipped")
        continue
      if len(faces) > 1:
        report.multiple_faces += 1
      lm_file.write(celeba.format_landmarks_line(name, faces[0].landmarks) + "\n")
      report.labelled += 1
      if report.labelled % 1000 == 0:
        lm_file.flush()
        log(f"{report.labelled} images labelled")
  log(f"labelled {report.labelled}, failed {report.failed} (listed in {fail_path}), "
      f"{report.multiple_faces} with several faces (best-scoring face used), "
      f"{report.already_done} already done; landmarks in {lm_path}")
  return report
