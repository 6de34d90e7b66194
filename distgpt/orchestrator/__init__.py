"""Running a job on a Ray cluster: the only package (with ``tune``) that imports Ray.

``driver.run_on_ray`` connects (or starts a loopback cluster), reads the inventory from Ray, takes or plans a Plan and
starts a ``Controller`` actor. The controller (an explicit state machine) reserves placement groups from the Plan,
starts one ``TrainWorker`` actor per rank and drives them; failures go through ``distgpt.recovery``'s policy.
"""
