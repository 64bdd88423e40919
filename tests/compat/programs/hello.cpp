#include <algorithm>
#include <future>
#include <iostream>
#include <map>
#include <numeric>
#include <thread>
#include <vector>

int main() {
    std::vector<int> v(10);
    std::iota(v.begin(), v.end(), 1);
    auto total = std::async(std::launch::async, [&] { return std::accumulate(v.begin(), v.end(), 0); });
    std::map<std::string, int> counts{{"b", 2}, {"a", 1}};
    for (auto &[k, n] : counts) std::cout << k << "=" << n << " ";
    std::cout << "sum=" << total.get() << " threads-ok=" << (std::thread::hardware_concurrency() > 0) << "\n";
    try { throw std::runtime_error("thrown and caught"); }
    catch (const std::exception &e) { std::cout << e.what() << "\n"; }
}
