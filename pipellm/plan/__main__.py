from pipellm.plan.planner import main

main()
