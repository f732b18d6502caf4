"""`make bench`: amqp-listener against hand-written aio-pika and pika, in one run.

Every measurement runs in a fresh subprocess on fresh queues named `bench-<token>...`:

* `names`     what a run declares on the broker (the framework's own topology, for both sides)
* `recorder`  what every consumer process calls per message, and how results reach the parent
* `apps`      the listeners `amqp-listener run bench.apps` hosts
* `publish`   the framework's publishers (`notify`, `notify_many`, `anotify_many`), timed
* `baselines` the same jobs written by hand on aio-pika and pika
* `broker`    the parent's view of the broker: declare, pre-fill, count, delete
* `procs`     starting, waiting for and stopping the subprocesses
* `cases`     the cases, their baselines and goals, and how each is measured
* `report`    the table and the JSON document

Run `python -m bench --help`.
"""
