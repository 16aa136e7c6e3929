"""What the tests share: real processes (``processes``: worker, receiver, beat, the shell, one
``free_port``), private services a fault test may break (``faults``), waiting for a condition
(``polling``), reading metrics (``metrics``), and arranging real data through the public functions
(``data``)."""
