"""Offline image data for diki-edge: real-image loaders (:mod:`.sources`) and the DCIL benchmark (:mod:`.dcil`).

Nothing here downloads anything; see the module docstrings for the sources and their licenses.
"""

from .dcil import (
                   TASK_NAMES,
                   TASK_ORDERS,
                   TEMPLATE,
                   Task,
                   dcil_benchmark,
                   dcil_tasks,
                   make_task,
                   pretraining_sets,
                   write_image_folder,
                   zero_shot_holdouts,
)
from .sources import (
                   DIGIT_NAMES,
                   FASHION_NAMES,
                   TEXTURE_NAMES,
                   ImageSet,
                   emoji_concepts,
                   fashion_mnist_available,
                   load_fashion_mnist,
                   load_lfw_faces,
                   load_mnist,
                   load_noto_emoji,
                   load_openmoji,
                   load_pen_digits,
                   load_photos,
                   load_sklearn_digits,
                   load_textures,
                   noto_emoji_available,
)

__all__ = [
    "ImageSet", "Task", "TEMPLATE", "TASK_NAMES", "TASK_ORDERS", "DIGIT_NAMES", "FASHION_NAMES", "TEXTURE_NAMES",
    "load_mnist", "load_sklearn_digits", "load_pen_digits", "load_textures", "load_lfw_faces", "load_photos",
    "load_openmoji", "load_noto_emoji", "load_fashion_mnist", "fashion_mnist_available", "noto_emoji_available",
    "emoji_concepts", "make_task", "dcil_tasks", "dcil_benchmark", "zero_shot_holdouts", "pretraining_sets",
    "write_image_folder",
]
