"""Tasks: data, checker and evaluation of a task, apart from the methods that train on it."""
