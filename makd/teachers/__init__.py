"""Teachers that answer yes/no aspect questions about images."""

from makd.teachers.base import AspectScores, Teacher
from makd.teachers.registry import TEACHERS, build_teacher

__all__ = ["AspectScores", "Teacher", "TEACHERS", "build_teacher"]
