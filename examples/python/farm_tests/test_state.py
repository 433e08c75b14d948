"""Every slice starts from the parent's state: the files it was given, its working directory."""
import os


def test_the_tests_are_where_the_parent_put_them():
    assert {"test_arrays.py", "test_state.py", "test_text.py"} <= set(os.listdir("/work/tests"))


def test_the_working_directory_is_the_parents():
    assert os.getcwd() == "/work/tests"
