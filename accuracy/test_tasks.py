"""The other accuracy tasks (npuinfer/tasks/*.yaml): one case per task x model x subject
(``test_task[<task>-<model>-<subject>]``), run when ``--task`` names them.

    pytest accuracy/ --task mmlu                       tiny model, the MMLU sample shipped with npuinfer
    pytest accuracy/ --task cmmlu --task mmlu --task-dir mmlu=/data/mmlu/data --model qwen-7b
    pytest accuracy/ --task gsm8k_cot -k gsm8k

Options, resumable results and the baseline gate: npuinfer/pytest_plugin/accuracy.py.
"""


def test_task(ceval_suite, task_name, task_model, task_subject, record_property):
    ceval_suite.run_case(task_model, task_subject, record_property, task_name)
