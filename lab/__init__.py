"""The lab's exercises (exercises.py, to fill in) and their grader (python -m lab.grade); see docs/lab.md."""
