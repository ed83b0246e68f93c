// A fixed pool of worker threads for data-parallel loops. The calling thread takes
// part, so ThreadPool(1) runs everything inline with no synchronisation at all.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace bioquant {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads <= 0: all hardware threads
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls body(task) for every task in [0, n_tasks), spread over the threads.
  // Returns when all are done. Not re-entrant.
  void parallel_for(size_t n_tasks, const std::function<void(size_t)>& body);

  static int hardware_threads();

 private:
  void worker_loop(int index);
  void run_tasks();

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  const std::function<void(size_t)>* body_ = nullptr;
  size_t n_tasks_ = 0;
  std::atomic<size_t> next_task_{0};
  std::atomic<int> busy_workers_{0};
  std::atomic<unsigned> generation_{0};  // bumped (under mutex_) to publish a loop
  std::atomic<bool> stopping_{false};
  int sleeping_ = 0;  // workers blocked on work_ready_ (guarded by mutex_)
};

}  // namespace bioquant
