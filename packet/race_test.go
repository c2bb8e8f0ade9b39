//go:build race

package packet

// raceEnabled is set when testing with -race, under which sync.Pool drops
// items at random and allocation counts are not meaningful.
const raceEnabled = true
