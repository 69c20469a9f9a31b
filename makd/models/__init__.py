"""Students: a backbone with a class head and an aspect head on its pooled features."""

from makd.models.student import Student, StudentOutput, build_student

__all__ = ["Student", "StudentOutput", "build_student"]
