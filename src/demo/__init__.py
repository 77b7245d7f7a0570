"""The offline demo: a generated bilingual shapes dataset and the checks that only make sense on it.

Nothing in the library imports this package; demo configs name it by ``_target_``.
"""
