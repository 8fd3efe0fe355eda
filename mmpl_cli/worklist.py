"""What one worker knows of the task graph while it renders: which tasks are done and which are
ready, in priority order (ReadyTasks), and which results it holds in memory (HeldResults). Both
cost what the ready tasks and the held results cost, not what the batch does, so a worker's memory
and its time per pick stay flat over a thousand shots (runtime.py runs the loop that uses them).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Mapping

from mmpl_cli.errors import MMPLError
from mmpl_cli.plan import Task
from mmpl_cli.results import Latents, Result
from mmpl_cli.store import RenderStore


class LostResult(MMPLError):
    """A result a task reads was counted done but is gone from the folder or damaged: the runtime
    computes it again (ReadyTasks.reopen); anywhere else it stops the worker with this message."""

    def __init__(self, task_id: str):
        super().__init__(f"{task_id} is needed but its result is gone from the render folder or damaged; run again")
        self.task_id = task_id


HELD_RESULTS = 16  # results a worker keeps in memory at most: enough for the tasks it runs next


class HeldResults(Mapping):
    """Results by task id, for the tasks a worker runs: what it computed, or else what the store
    holds for the task's hash (read, and verified, when first needed). It keeps in memory only
    results that a task not yet done reads, and of those the HELD_RESULTS used last: a batch of a
    thousand shots whose planning chains all run first does not pile their latents up in every
    worker (a dropped result that is needed again is read again from the folder, the same bits)."""

    def __init__(self, store: RenderStore, hashes: dict[str, str], graph: ReadyTasks, limit: int = HELD_RESULTS):
        self.store, self.hashes, self.graph, self.limit = store, hashes, graph, limit
        self.held: OrderedDict[str, Result] = OrderedDict()

    def _read_later(self, task_id: str) -> bool:
        """Whether a task not yet done reads it (the graph's done set says which are)."""
        return any(reader not in self.graph.done for reader in self.graph.readers[task_id])

    def __getitem__(self, task_id: str) -> Result:
        if task_id in self.held:
            self.held.move_to_end(task_id)
            return self.held[task_id]
        found = self.store.load(task_id, self.hashes[task_id])
        if found is None:
            raise LostResult(task_id)
        self.keep(task_id, found)
        return found

    def __iter__(self):
        return iter(self.held)

    def __len__(self) -> int:
        return len(self.held)

    def keep(self, task_id: str, result: Result) -> None:
        if self._read_later(task_id):
            self.held[task_id] = result
            self.held.move_to_end(task_id)
            while len(self.held) > self.limit:
                self.held.popitem(last=False)

    def finished(self, task: Task) -> None:
        """`task` is done (here or elsewhere; the graph knows already): what it read is dropped once
        nothing left to run reads it."""
        for dep in task.deps:
            if not self._read_later(dep):
                self.held.pop(dep, None)

    def latents_held(self) -> int:
        return sum(isinstance(r, Latents) for r in self.held.values())


class ReadyTasks:
    """The task graph as one worker sees it: which tasks are done and which are ready (every input
    done, not done themselves), in priority order. Picking a task looks at ready tasks only, so its
    cost does not grow with the batch; a task another worker finishes is learnt when it is looked at."""

    def __init__(self, tasks: dict[str, Task], keys: dict[str, tuple]):
        self.keys = keys
        self.done: set[str] = set()
        self.waiting = {tid: len(t.deps) for tid, t in tasks.items()}  # inputs not done yet
        self.readers: dict[str, list[str]] = {tid: [] for tid in tasks}
        for tid, task in tasks.items():
            for dep in task.deps:
                self.readers[dep].append(tid)
        self.heap = [(keys[tid], tid) for tid, n in self.waiting.items() if n == 0]
        heapq.heapify(self.heap)

    def in_order(self):
        """Ready tasks, best first, including any that become ready while the caller looks; each is
        offered once per call (a skipped one goes back)."""
        skipped = []
        try:
            while self.heap:
                item = heapq.heappop(self.heap)
                if item[1] in self.done or self.waiting[item[1]]:  # done, or waiting again (reopen)
                    continue
                skipped.append(item)
                yield item[1]
        finally:
            for item in skipped:
                if item[1] not in self.done:
                    heapq.heappush(self.heap, item)

    def finished(self, task_id: str) -> None:
        if task_id in self.done:
            return
        self.done.add(task_id)
        for reader in self.readers[task_id]:
            self.waiting[reader] -= 1
            if self.waiting[reader] == 0 and reader not in self.done:
                heapq.heappush(self.heap, (self.keys[reader], reader))

    def reopen(self, task_id: str) -> None:
        """A task counted done whose result proved unusable when it was read (changed after another
        worker wrote it): it is to run again, and the tasks that read it wait for it again."""
        if task_id not in self.done:
            return
        self.done.discard(task_id)
        for reader in self.readers[task_id]:
            self.waiting[reader] += 1
        if self.waiting[task_id] == 0:
            heapq.heappush(self.heap, (self.keys[task_id], task_id))
