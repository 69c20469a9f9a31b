"""Students: a backbone with a class head and an aspect head on its pooled features, and the student file."""

from makd.models.student import Student, StudentOutput, build_student
from makd.models.student_file import export_student, load_student, read_student_meta

__all__ = ["Student", "StudentOutput", "build_student", "export_student", "load_student", "read_student_meta"]
