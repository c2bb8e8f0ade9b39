//go:build race

package main

// raceEnabled makes TestMultiProcess build the binary with -race too: it then
// reuses the packages compiled for this test, and checks the processes.
const raceEnabled = true
